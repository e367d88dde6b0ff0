"""disaggregation: the prefill/decode decider, wrapped around any prefill-side policy.

A model's pool is disaggregated when its candidates include PREFILL or DECODE backends; in a
pool of MIXED backends only, the wrapper returns the inner policy's decision unchanged.

Algorithm, per request in a disaggregated pool (every term in seconds):

1. Prefill side: the inner policy (``kv_aware`` in practice) chooses ``P`` among PREFILL and
   MIXED candidates; its score terms give ``ttft_P`` (queued prefill + uncached prefill + KV
   pressure). The inner policy also scores local prefill on each DECODE candidate (a second
   ``choose`` over DECODE backends only), which gives ``local_ttft_D`` and the decode backend's
   own cached prefix ``hit_D``; that ``choose``'s winner ``L`` is where a request that is not
   split goes (cache affinity), while a split request's decode side ``D`` is step 2's.
2. Decode side: for each DECODE or MIXED candidate ``D``::

       reused_D     = hit_D if D's engine reuses its own prefix cache on a remote prefill
                      (vLLM: the connector loads only the blocks it lacks), else 0 (SGLang)
       transfer_s_D = transfer_setup_s + (prompt - reused_D) * kv_bytes_per_token
                                         / network_bytes_per_s
       running_D    = max(engine running requests, router in-flight requests)
       decode_s_D   = max_tokens * (decode_step_s + decode_s_per_running_request * running_D)
       kv_wait_s_D  = kv_full_wait_s when its free blocks cannot hold prompt + max_tokens,
                      else kv_full_wait_s * ((kv_usage - kv_knee_ratio) / (1 - kv_knee_ratio))^2
       score_D      = transfer_s_D + decode_s_D + kv_wait_s_D

   The lowest score wins (exact ties by the injected RNG).
3. Split or local (conditional disaggregation):
   - ``P`` is MIXED: it serves the request itself (no transfer beats a transfer);
   - ``L`` is an SGLang DECODE server: split (it serves only bootstrapped requests);
   - ``prompt - hit_L < min_uncached_tokens``: local on ``L`` (too little to prefill elsewhere);
   - ``local_ttft_L + stall_weight * running_L * prefill_s_L <= ttft_P + transfer_s_D``: local
     on ``L`` (prefilling there is faster, counting the stall a local prefill inflicts on the
     requests decoding on ``L``; ``stall_weight`` 0 compares TTFT alone);
   - otherwise split: ``Decision(backend_id=D, prefill_backend_id=P)``.
   With no prefill-side candidate the best decode backend serves locally; with no decode-side
   candidate the prefill winner does.

Parameters (``DisaggregationParams``, units in names): ``min_uncached_tokens`` 512 (llm-d's
decider threshold), ``kv_bytes_per_token`` 131072 (Llama-3.1-8B bf16: 32 layers x 8 KV heads
x 128 x K,V x 2 bytes), ``network_bytes_per_s`` 25e9 (a 200 Gb/s RDMA NIC), ``transfer_setup_s``
0.002, ``decode_step_s`` 0.004 (the H200 8B step floor), ``decode_s_per_running_request``
0.0001, ``kv_full_wait_s`` 1.0, ``kv_knee_ratio`` 0.8, ``stall_weight`` 1.0 (every second of
delay counts the same, this request's or a running one's), ``conditional`` true (false: split every
request a PREFILL and a decode backend can share, as the peers' P/D modes do).

Decision.scores: the inner policy's prefill-side scores first (so its ``on_dispatched`` finds
them), then its local scores of DECODE backends, then one decode-side score per decode
candidate whose terms all start with ``decode_`` and whose ``decode`` holds the estimate. The reason names the rule that decided.
Cost per request: two inner ``choose`` calls (one index match, ``policies.kv.lookup``) +
O(decode candidates). Pure: no I/O, clock or
global RNG. Must not import anything outside the standard library and ``policies``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from policies.base import PolicyWrapper
from policies.kv.lookup import MatchOnce
from policies.params import parse_params
from policies.prefill_cost import PrefillCost
from policies.types import (
    BackendId,
    BackendScore,
    BackendState,
    ClusterView,
    Decision,
    DecodeEstimate,
    EngineKind,
    Policy,
    Role,
    RouteRequest,
)

__all__ = ["Disaggregated", "DisaggregationParams", "is_disaggregated", "wrap"]

# Engines whose decode side loads only the blocks it does not already hold.
_REUSES_PREFIX = frozenset({EngineKind.VLLM})
# Engines whose PREFILL/DECODE servers serve only paired (bootstrapped) requests.
_PAIRED_ONLY = frozenset({EngineKind.SGLANG})


@dataclass(frozen=True, slots=True)
class DisaggregationParams:
    min_uncached_tokens: int = 512
    kv_bytes_per_token: int = 131072
    network_bytes_per_s: float = 25e9
    transfer_setup_s: float = 0.002
    decode_step_s: float = 0.004
    decode_s_per_running_request: float = 0.0001
    kv_full_wait_s: float = 1.0
    kv_knee_ratio: float = 0.8
    conditional: bool = True
    stall_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.min_uncached_tokens < 0 or self.kv_bytes_per_token < 0:
            raise ValueError("min_uncached_tokens and kv_bytes_per_token must be >= 0")
        if self.network_bytes_per_s <= 0:
            raise ValueError("network_bytes_per_s must be > 0")
        for name in ("transfer_setup_s", "decode_step_s", "decode_s_per_running_request",
                     "kv_full_wait_s", "stall_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0.0 <= self.kv_knee_ratio < 1.0:
            raise ValueError("kv_knee_ratio must be within [0, 1)")

    def transfer_s(self, tokens: float) -> float:
        """Time to move the KV of ``tokens`` tokens from a prefill to a decode backend."""
        return self.transfer_setup_s + max(tokens, 0.0) * self.kv_bytes_per_token / (
            self.network_bytes_per_s)


def is_disaggregated(backends: tuple[BackendState, ...]) -> bool:
    # Called on every request, mostly for mixed pools: a plain loop costs a third of any(genexpr).
    mixed = Role.MIXED
    for b in backends:
        if b.role is not mixed:
            return True
    return False


class Disaggregated(PolicyWrapper):
    """The decider around ``inner``; keeps ``inner``'s name so metrics labels do not move.
    The hooks that carry a decision hand ``inner`` the decision without decode-side scores."""

    def __init__(self, inner: Policy, params: DisaggregationParams, rng: random.Random) -> None:
        super().__init__(inner)
        self.params = params
        self._rng = rng
        self._fallback_cost = PrefillCost()

    # ---- scoring ------------------------------------------------------------------------

    def _ttft_s(self, request: RouteRequest, score: BackendScore | None) -> tuple[float, float]:
        """(predicted TTFT, uncached tokens) from an inner score; a bare prefill estimate
        when the inner policy does not predict TTFT."""
        prompt = float(request.prompt_tokens)
        if score is None:
            return self._fallback_cost.seconds(prompt), prompt
        predicted = score.prediction
        if predicted is not None:
            return predicted.ttft_s, predicted.uncached_tokens
        uncached = prompt - score.matched_tokens
        return self._fallback_cost.seconds(uncached, prompt - uncached), uncached

    def _decode_score(
        self, request: RouteRequest, backend: BackendState, local: BackendScore | None
    ) -> BackendScore:
        p = self.params
        prompt = request.prompt_tokens
        hit = float(local.matched_tokens) if local is not None else 0.0
        reused = hit if backend.engine in _REUSES_PREFIX else 0.0
        transfer_s = p.transfer_s(prompt - reused)
        running = max(backend.engine_running_requests or 0, backend.in_flight_requests)
        decode_s = request.max_tokens * (p.decode_step_s + p.decode_s_per_running_request * running)
        usage = backend.kv_usage_ratio
        kv_wait_s = 0.0
        if usage is not None:
            need = math.ceil((prompt + request.max_tokens) / request.block_size)
            total = backend.total_kv_blocks
            if total is not None and total * (1.0 - usage) < need:
                kv_wait_s = p.kv_full_wait_s
            elif usage > p.kv_knee_ratio:
                pressure = (usage - p.kv_knee_ratio) / (1.0 - p.kv_knee_ratio)
                kv_wait_s = p.kv_full_wait_s * min(pressure, 1.0) ** 2
        score = transfer_s + decode_s + kv_wait_s
        return BackendScore(
            backend_id=backend.backend_id,
            score=score,
            matched_tokens=int(reused),
            terms={
                "decode_score_s": score,
                "decode_transfer_s": transfer_s,
                "decode_s": decode_s,
                "decode_kv_wait_s": kv_wait_s,
                "decode_running_requests": float(running),
                "decode_reused_tokens": reused,
            },
            decode=DecodeEstimate(transfer_s, decode_s, kv_wait_s, running),
        )

    def _pick(self, scores: list[BackendScore]) -> BackendScore:
        best = min(s.score for s in scores)
        return self._rng.choice([s for s in scores if s.score == best])

    # ---- the Policy interface -------------------------------------------------------------

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        if not is_disaggregated(view.backends):
            return self.inner.choose(request, view)
        if view.index is not None:  # the inner policy is asked twice: match the chain once
            view = dataclasses.replace(view, index=MatchOnce(view.index))
        prefill_side = tuple(b for b in view.backends if b.role is not Role.DECODE)
        decode_only = tuple(b for b in view.backends if b.role is Role.DECODE)
        on_decode: Decision | None = None
        decode_side = tuple(b for b in view.backends if b.role is not Role.PREFILL)
        if not decode_side:
            inner = self.inner.choose(request, dataclasses.replace(view, backends=prefill_side))
            return dataclasses.replace(
                inner, reason=f"disaggregation: local on prefill (no decode backend); {inner.reason}")
        scores: list[BackendScore] = []
        prefill: Decision | None = None
        if prefill_side:
            prefill = self.inner.choose(request, dataclasses.replace(view, backends=prefill_side))
            scores.extend(prefill.scores)
        local_scores: dict[BackendId, BackendScore] = {s.backend_id: s for s in scores}
        if decode_only:
            on_decode = self.inner.choose(
                request, dataclasses.replace(view, backends=decode_only))
            only = {b.backend_id for b in decode_only}
            extra = [s for s in on_decode.scores if s.backend_id in only]
            scores.extend(extra)
            local_scores.update((s.backend_id, s) for s in extra)
        decode_scores = [
            self._decode_score(request, b, local_scores.get(b.backend_id)) for b in decode_side]
        scores.extend(decode_scores)
        chosen = self._pick(decode_scores)
        d_id = chosen.backend_id
        # Local prefill goes where the inner policy would prefill among the DECODE backends
        # (cache affinity); the split's decode side is the best decode score (load).
        l_id = on_decode.backend_id if on_decode is not None else d_id
        local_ttft_s, uncached = self._ttft_s(request, local_scores.get(l_id))
        hit_l = local_scores[l_id].matched_tokens if l_id in local_scores else 0

        def local(reason: str, backend_id: BackendId = l_id, hit: int = hit_l) -> Decision:
            return Decision(backend_id=backend_id, reason=f"disaggregation: local, {reason}",
                            predicted_hit_tokens=hit, scores=tuple(scores))

        if prefill is None:
            return local("no prefill backend")
        p_id = prefill.backend_id
        p_role = next(b.role for b in prefill_side if b.backend_id == p_id)
        if p_role is Role.MIXED or p_id == d_id:
            return local(f"mixed prefill winner {p_id} serves it", p_id,
                         prefill.predicted_hit_tokens)
        l_role = next(b.role for b in decode_side if b.backend_id == l_id)
        if l_role is Role.DECODE and chosen_engine(decode_side, l_id) in _PAIRED_ONLY:
            return Decision(
                backend_id=d_id,
                reason=f"disaggregation: split, prefill on {p_id} then decode (an SGLang "
                       "decode backend serves only bootstrapped requests)",
                predicted_hit_tokens=prefill.predicted_hit_tokens,
                prefill_backend_id=p_id,
                scores=tuple(scores),
            )
        if not self.params.conditional:
            return Decision(
                backend_id=d_id,
                reason=f"disaggregation: split, prefill on {p_id} then decode (conditional "
                       "disaggregation off)",
                predicted_hit_tokens=prefill.predicted_hit_tokens,
                prefill_backend_id=p_id,
                scores=tuple(scores),
            )
        if uncached < self.params.min_uncached_tokens:
            return local(f"{uncached:.0f} uncached tokens < min_uncached_tokens "
                         f"{self.params.min_uncached_tokens}")
        prefill_ttft_s, _ = self._ttft_s(
            request, next((s for s in prefill.scores if s.backend_id == p_id), None))
        assert chosen.decode is not None  # made by _decode_score
        split_ttft_s = prefill_ttft_s + chosen.decode.transfer_s
        # A local prefill also stalls every request decoding on L for about its duration.
        l_score = local_scores.get(l_id)
        l_predicted = l_score.prediction if l_score else None
        l_prefill_s = l_predicted.prefill_s if l_predicted else local_ttft_s
        running = next(s.decode.running_requests for s in decode_scores
                       if s.backend_id == l_id and s.decode is not None)
        stall_s = self.params.stall_weight * running * l_prefill_s
        if local_ttft_s + stall_s <= split_ttft_s:
            return local(f"predicted TTFT {local_ttft_s:.4f} s local (+ {stall_s:.4f} s stall "
                         f"of {running:.0f} running) <= {split_ttft_s:.4f} s prefill + transfer")
        return Decision(
            backend_id=d_id,
            reason=(f"disaggregation: split, prefill on {p_id} then decode; predicted TTFT "
                    f"{split_ttft_s:.4f} s prefill + transfer < {local_ttft_s:.4f} s local "
                    f"+ {stall_s:.4f} s stall of {running:.0f} running"),
            predicted_hit_tokens=prefill.predicted_hit_tokens,
            prefill_backend_id=p_id,
            scores=tuple(scores),
        )

    def _for_inner(self, decision: Decision) -> Decision:
        """The decision without the decode-side scores, which the inner policy never made."""
        scores = decision.scores
        # Mixed pools (the common case) have no decode-side scores: no copy per hook call.
        for s in scores:
            if s.decode is not None:
                break
        else:
            return decision
        return dataclasses.replace(decision, scores=tuple(s for s in scores if s.decode is None))

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        # Written out, not inherited: PolicyWrapper's pass-throughs run interpreted
        # (policies/base.py is not compiled), and this one runs on every request.
        return self.inner.defer(request, view)

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_dispatched(request, self._for_inner(decision), now_s)

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_first_token(request, self._for_inner(decision), now_s)

    def on_finished(
        self, request: RouteRequest, decision: Decision, now_s: float, ok: bool
    ) -> None:
        self.inner.on_finished(request, self._for_inner(decision), now_s, ok)

    def shares_dispatch(self, request: RouteRequest, decision: Decision, now_s: float) -> bool:
        return self.inner.shares_dispatch(request, self._for_inner(decision), now_s)

    def on_peer_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.inner.on_peer_dispatched(request, self._for_inner(decision), now_s)


def chosen_engine(backends: tuple[BackendState, ...], backend_id: BackendId) -> EngineKind:
    return EngineKind(next(b.engine for b in backends if b.backend_id == backend_id))


def wrap(inner: Policy, params: Mapping[str, object] | None, rng: random.Random,
         path: str = "disaggregation") -> Disaggregated:
    """Wrap ``inner``; ``params`` are validated into DisaggregationParams (errors name
    ``path``)."""
    return Disaggregated(inner, parse_params(DisaggregationParams, params, path), rng)
