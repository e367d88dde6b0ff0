"""Disaggregated fleets in the cluster simulator: K prefill + N-K decode engines, KV transfers.

``DisaggClusterSim`` is ``simulator.cluster.ClusterSim`` with roles: engines ``engine-0`` ..
``engine-{K-1}`` are PREFILL, the rest DECODE (``prefill_backends = 0`` gives the all-MIXED
fleet, routed by the same code, for a like-for-like comparison). The policy is wrapped in the
live router's decider (``policies.disaggregation.wrap``), so split/local decisions are the
production ones. A split request, in virtual time:

1. the prefill engine gets it with ``max_tokens = 1`` (vLLM's prefill leg); the router counts
   it in flight there with its prompt tokens, as the live router does during the leg;
2. when that token is out, the KV travels for ``transfer_setup_s + tokens * kv_bytes_per_token
   / network_bytes_per_s`` (tokens: what the decode engine does not already hold, as vLLM's
   connector pulls only missing blocks);
3. the blocks land in the decode engine's prefix cache (stored, emitting its KV events, so the
   index learns the decode engine holds them) and the request joins the decode engine, which
   finds them cached and computes only the last partial block; its first token is the client's
   first token. A decode engine with no free blocks for the pull recomputes (vLLM's fallback).

The live router's P/D protocol failures are not simulated. Extra summary fields:
``split_requests``, ``local_requests``, ``transfer_tokens``, ``transfer_s_mean``,
``prefill_backends``. Deterministic like ``ClusterSim``. Must not import ``router``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from policies.bookkeeping import decide
from policies.disaggregation import DisaggregationParams, wrap
from policies.kv.events import KvEvent
from policies.params import parse_params
from policies.registry import build_policy
from policies.types import Decision, Role, RouteRequest
from simulator.cluster import ClusterSim, Progress, SimConfig, _Live, prompt_text_of
from simulator.engine.cost_model import CostModel
from simulator.engine.model import EngineRequest, StepResult
from simulator.inputs import config_dict
from simulator.routing import SimRouter
from simulator.traces import TraceRequest

__all__ = ["DisaggClusterSim", "simulate_disagg"]

_PREFILL_LEG = "/prefill"


class _RoleRouter(SimRouter):
    """SimRouter with roles, and the live router's split accounting: the prefill backend
    holds the prompt during its leg; the decode backend holds the request with no prompt
    tokens (it computes none)."""

    def __init__(self, roles: tuple[Role, ...], **kwargs: Any) -> None:
        super().__init__(n_backends=len(roles), **kwargs)
        self.roles = roles
        for slot, role in zip(self._slots, roles, strict=True):
            slot.role = role

    def _hold(self, backend_id: str, prompt_tokens: int, sign: int) -> None:
        slot = self._slots[self.position(backend_id)]
        if sign > 0:
            slot.acquire(prompt_tokens)
        else:
            slot.release(prompt_tokens)

    def route(self, request: RouteRequest, now_s: float) -> Decision:
        decision = decide(self.policy, request, self.view(now_s))
        split = decision.prefill_backend_id is not None
        self._hold(decision.backend_id, 0 if split else request.prompt_tokens, 1)
        if decision.prefill_backend_id is not None:
            self._hold(decision.prefill_backend_id, request.prompt_tokens, 1)
        self.policy.on_dispatched(request, decision, now_s)
        return decision

    def prefill_done(self, request: RouteRequest, decision: Decision) -> None:
        assert decision.prefill_backend_id is not None
        self._hold(decision.prefill_backend_id, request.prompt_tokens, -1)

    def first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        if request.stream:
            self.policy.on_first_token(request, decision, now_s)

    def finish(self, request: RouteRequest, decision: Decision, now_s: float, ok: bool) -> None:
        split = decision.prefill_backend_id is not None
        self._hold(decision.backend_id, 0 if split else request.prompt_tokens, -1)
        self.policy.on_finished(request, decision, now_s, ok)


class DisaggClusterSim(ClusterSim):
    def __init__(
        self,
        config: SimConfig,
        policy_name: str,
        prefill_backends: int,
        policy_params: Mapping[str, object] | None = None,
        disagg_params: Mapping[str, object] | None = None,
        cost: CostModel | None = None,
        progress: Progress | None = None,
    ) -> None:
        if not 0 <= prefill_backends < config.backends:
            raise ValueError("prefill_backends must be within [0, backends)")
        super().__init__(config, policy_name, policy_params, cost=cost, progress=progress)
        self.prefill_backends = prefill_backends
        params = parse_params(DisaggregationParams, disagg_params, "disaggregation")
        if cost is None and "kv_bytes_per_token" not in (disagg_params or {}):
            params = dataclasses.replace(params, kv_bytes_per_token=self.cost.kv_bytes_per_token
                                         or params.kv_bytes_per_token)
        self.disagg = params
        rng = random.Random(config.seed)
        policy = wrap(build_policy(policy_name, self.policy_params, rng), asdict(params), rng)
        roles = (Role.MIXED,) * config.backends if prefill_backends == 0 else (
            (Role.PREFILL,) * prefill_backends
            + (Role.DECODE,) * (config.backends - prefill_backends))
        self._roles = _RoleRouter(roles, policy=policy, kv_events=config.kv_events,
                                  engine_signals_max_age_s=config.engine_signals_max_age_s)
        self.router = self._roles
        self._prefill_hits: dict[str, int] = {}  # split request -> tokens its prefill hit
        self.split_requests = self.local_requests = self.transfer_tokens = 0
        self.transfer_s_total = 0.0

    def _arrive(self, trace: TraceRequest) -> None:
        now = self.loop.now_s
        self._schedule_next_arrival()
        self.metrics.on_arrival(trace.arrival_s)
        assert self.oracle is not None
        blocks = trace.full_blocks
        self.oracle.observe(blocks, trace.block_size, trace.input_tokens)
        self._seq += 1
        key = str(self._seq)
        route = RouteRequest(
            request_id=key, model=self.config.model, prompt_tokens=trace.input_tokens,
            prompt_text=prompt_text_of(trace, self.config.chars_per_token),
            session_key=trace.session_id, block_hashes=blocks, block_size=trace.block_size,
            max_tokens=max(trace.output_tokens, 1), stream=True, tokens_exact=True,
        )
        decision = self.router.route(route, now)
        position = self.router.position(decision.backend_id)
        self.metrics.on_routed(position)
        live = _Live(trace, route, decision, position)
        if decision.prefill_backend_id is None:
            self.local_requests += 1
            self._submit(live, key, route.max_tokens, position)
            return
        self.split_requests += 1
        # The prefill leg; its output comes back under its own id (see _outputs).
        self._submit(live, key + _PREFILL_LEG, 1,
                     self.router.position(decision.prefill_backend_id))

    def _submit(self, live: _Live, key: str, max_tokens: int, position: int) -> None:
        now = self.loop.now_s
        trace = live.trace
        try:
            self.engines[position].add_request(
                EngineRequest(key, trace.input_tokens, max_tokens, block_keys=trace.full_blocks),
                now)
        except ValueError:
            # The engine refuses it (too long for its memory or max_model_len), as vLLM would.
            self.metrics.on_failed()
            if key.endswith(_PREFILL_LEG):
                self._roles.prefill_done(live.route, live.decision)
            self.router.finish(live.route, live.decision, now, ok=False)
            return
        self._live[key] = live
        # Hand the engine work as ClusterSim._arrive does: an idle engine steps from now.
        if self._pending[position] is None and self._wake[position] is None:
            self._wake[position] = self.loop.now_s

    def _outputs(self, result: StepResult) -> None:
        hits = self._prefill_hits
        if hits or any(o.request_id.endswith(_PREFILL_LEG) for o in result.outputs):
            outputs = []
            for out in result.outputs:
                if out.request_id.endswith(_PREFILL_LEG):
                    if out.finished:
                        hits[out.request_id[: -len(_PREFILL_LEG)]] = out.cached_tokens
                        self._prefilled(out.request_id)
                elif out.first_token and out.request_id in hits:
                    # The hit rate is the prefill engine's: the decode engine's "hit" is the
                    # KV it was sent.
                    outputs.append(dataclasses.replace(
                        out, cached_tokens=hits.pop(out.request_id)))
                else:
                    outputs.append(out)
            result = dataclasses.replace(result, outputs=tuple(outputs))
        super()._outputs(result)

    def _prefilled(self, leg_id: str) -> None:
        live = self._live.pop(leg_id)
        self._roles.prefill_done(live.route, live.decision)
        decode = self.engines[live.position]
        held = decode.peek_cached_tokens(live.trace.full_blocks, live.trace.input_tokens)
        tokens = max(live.trace.input_tokens - held, 0)
        transfer_s = self.disagg.transfer_s(tokens)
        self.transfer_tokens += tokens
        self.transfer_s_total += transfer_s
        self.loop.after(transfer_s, self._landed, live, leg_id[: -len(_PREFILL_LEG)])

    def _landed(self, live: _Live, key: str) -> None:
        """The KV arrived: store it in the decode engine's cache, then queue the decode."""
        engine = self.engines[live.position]
        keys = live.trace.full_blocks
        events: list[KvEvent] = []
        cache = engine.cache
        if keys and cache.allocate_anonymous(len(keys), events):
            cache.store(keys, None, (), events)
            cache.release(keys, 0, events)
        if events:
            self._deliver(live.position, tuple(events))
        self._submit(live, key, live.route.max_tokens, live.position)

    def run(self, requests: Iterable[TraceRequest]) -> dict[str, Any]:
        summary = super().run(requests)
        n = self.config.backends
        k = self.prefill_backends
        summary.update(
            policy=f"{self.policy_name} " + (f"{k}P+{n - k}D" if k else "mixed"),
            prefill_backends=self.prefill_backends,
            split_requests=self.split_requests,
            local_requests=self.local_requests,
            transfer_tokens=self.transfer_tokens,
            transfer_s_mean=self.transfer_s_total / self.split_requests
            if self.split_requests else 0.0,
            disaggregation=asdict(self.disagg),
        )
        return summary


def simulate_disagg(
    config: SimConfig,
    policy_name: str,
    prefill_backends: int,
    requests: Iterable[TraceRequest],
    policy_params: Mapping[str, object] | None = None,
    disagg_params: Mapping[str, object] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    sim = DisaggClusterSim(config, policy_name, prefill_backends, policy_params, disagg_params,
                           progress=progress)
    summary = sim.run(requests)
    summary["config"] = config_dict(config)
    return summary
