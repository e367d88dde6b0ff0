"""The prefill/decode decider: table-driven split/local decisions over a real PrefixIndex and
the real kv_aware policy as the prefill-side scorer."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from policies.disaggregation import Disaggregated, DisaggregationParams, wrap
from policies.kv.events import BlockStored
from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex
from policies.kv_aware import create as kv_aware
from policies.params import ParamError
from policies.registry import build_policy
from policies.types import BackendState, ClusterView, EngineKind, Role, RouteRequest

BS = 16
HASHER = BlockHasher(Namespace("m"), BS)


def prompt(tokens: int, group: int = 1, max_tokens: int = 64) -> RouteRequest:
    ids = [group * 100_003 + i for i in range(tokens)]
    return RouteRequest(request_id=f"r{group}", model="m", prompt_tokens=tokens,
                        block_hashes=HASHER.hash_tokens(ids), block_size=BS, tokens_exact=True,
                        max_tokens=max_tokens)


def hold(index: PrefixIndex, backend: str, hashes: Sequence[int]) -> None:
    index.apply(backend, BlockStored(tuple(hashes), None, (), BS, medium="GPU"), 0.0)


def backend(backend_id: str, role: Role, **kw: object) -> BackendState:
    kw.setdefault("kv_events", True)
    return BackendState(backend_id=backend_id, role=role, **kw)  # type: ignore[arg-type]


def decider(seed: int = 0, **params: object) -> Disaggregated:
    rng = random.Random(seed)
    return wrap(kv_aware({}, rng), params, rng)


P, D, M = Role.PREFILL, Role.DECODE, Role.MIXED

# (backends as (id, role, state overrides), tokens held per backend in blocks, prompt tokens,
#  params, expected backend_id, expected prefill_backend_id, a word the reason must contain)
CASES = [
    ([("p0", P, {}), ("d0", D, {})], {"p0": 440}, 8000, {}, "d0", "p0", "split"),
    ([("p0", P, {}), ("d0", D, {})], {}, 300, {}, "d0", None, "uncached"),
    ([("p0", P, {}), ("d0", D, {})], {"d0": 480}, 8000, {}, "d0", None, "uncached"),
    ([("p0", P, {}), ("d0", D, {})], {}, 8000, {}, "d0", None, "TTFT"),
    ([("p0", P, {}), ("d0", D, {"in_flight_prompt_tokens": 40000, "in_flight_requests": 5})],
     {}, 8000, {}, "d0", "p0", "split"),
    ([("p0", P, {}), ("d0", D, {})], {"p0": 440}, 8000, {"network_bytes_per_s": 1e8},
     "d0", None, "TTFT"),
    ([("p0", P, {}), ("d0", D, {})], {"p0": 440}, 8000, {"min_uncached_tokens": 9000},
     "d0", None, "uncached"),
    ([("m0", M, {}), ("p0", P, {}), ("d0", D, {})], {"m0": 480}, 8000, {}, "m0", None,
     "mixed"),
    ([("p0", P, {})], {"p0": 440}, 8000, {}, "p0", None, "no decode"),
    ([("d0", D, {}), ("d1", D, {})], {"d1": 440}, 8000, {}, "d1", None, "no prefill"),
    ([("p0", P, {}), ("d0", D, {"engine_running_requests": 200}), ("d1", D, {})],
     {"p0": 440}, 8000, {}, "d1", "p0", "split"),
    ([("p0", P, {}), ("d0", D, {"kv_usage_ratio": 0.99, "total_kv_blocks": 1000}),
      ("d1", D, {"engine_running_requests": 20})], {"p0": 440}, 8000, {}, "d1", "p0", "split"),
    ([("p0", P, {}), ("d0", D, {"engine_running_requests": 3}),
      ("d1", D, {"engine_running_requests": 3})], {"p0": 440, "d1": 200}, 8000, {}, "d1",
     "p0", "split"),
    ([("p0", P, {"engine": EngineKind.SGLANG}), ("d0", D, {"engine": EngineKind.SGLANG})], {},
     300, {}, "d0", "p0", "bootstrapped"),
    ([("p0", P, {}), ("d0", D, {})], {}, 300, {"conditional": False}, "d0", "p0", "off"),
    ([("p0", P, {}), ("d0", D, {"engine_running_requests": 30}), ("d1", D, {})], {"d0": 480},
     8000, {}, "d0", None, "uncached"),
    ([("p0", P, {}), ("d0", D, {"engine_running_requests": 8})], {}, 8000, {}, "d0", "p0",
     "stall of 8 running"),
    ([("p0", P, {}), ("d0", D, {"engine_running_requests": 8})], {}, 8000,
     {"stall_weight": 0.0}, "d0", None, "TTFT"),
]
IDS = [
    "long-prompt-cached-on-prefill-splits",
    "short-prompt-stays-local",
    "decode-holds-prefix-stays-local",
    "idle-pods-no-cache-local-is-faster",
    "busy-decode-queue-splits",
    "slow-network-stays-local",
    "high-threshold-stays-local",
    "mixed-winner-serves-itself",
    "no-decode-backend",
    "no-prefill-backend-uses-decode-cache",
    "decode-side-avoids-long-batch",
    "decode-side-avoids-full-kv",
    "decode-side-credits-its-own-prefix",
    "sglang-decode-cannot-prefill-alone",
    "unconditional-splits-short-prompts",
    "local-goes-to-the-decode-cache-holder",
    "local-prefill-would-stall-a-decode-batch",
    "stall-ignored-with-zero-weight",
]


@pytest.mark.parametrize(
    ("backends", "held", "tokens", "params", "expected", "expected_prefill", "word"), CASES,
    ids=IDS)
def test_split_or_local(
    backends: list[tuple[str, Role, dict[str, object]]], held: dict[str, int], tokens: int,
    params: dict[str, object], expected: str, expected_prefill: str | None, word: str,
) -> None:
    index = PrefixIndex()
    request = prompt(tokens)
    for backend_id, blocks in held.items():
        hold(index, backend_id, request.block_hashes[:blocks])
    view = ClusterView(now_s=0.0, backends=tuple(backend(b, r, **kw) for b, r, kw in backends),
                       index=index)
    for seed in range(5):
        decision = decider(seed, **params).choose(request, view)
        assert decision.backend_id == expected, decision.reason
        assert decision.prefill_backend_id == expected_prefill, decision.reason
        assert word in decision.reason
        decode_terms = [s for s in decision.scores if s.decode is not None]
        assert {s.backend_id for s in decode_terms} == {
            b for b, r, _ in backends if r is not Role.PREFILL}


def test_sglang_decode_gets_no_prefix_credit() -> None:
    # The same decode backend holding the prompt: vLLM reuses it (short transfer), SGLang
    # transfers everything.
    index = PrefixIndex()
    request = prompt(8000)
    hold(index, "d0", request.block_hashes[:400])
    scores = {}
    for engine in EngineKind:
        view = ClusterView(0.0, (backend("p0", P, engine=engine), backend("d0", D, engine=engine)),
                           index)
        decision = decider().choose(request, view)
        (score,) = [s for s in decision.scores if s.decode is not None]
        scores[engine] = score.terms
    assert scores[EngineKind.VLLM]["decode_reused_tokens"] == 400 * BS
    assert scores[EngineKind.SGLANG]["decode_reused_tokens"] == 0
    assert scores[EngineKind.SGLANG]["decode_transfer_s"] > scores[EngineKind.VLLM][
        "decode_transfer_s"]


def test_all_mixed_pool_is_the_inner_decision() -> None:
    index = PrefixIndex()
    request = prompt(4000)
    hold(index, "m2", request.block_hashes[:200])
    view = ClusterView(0.0, tuple(backend(f"m{i}", M) for i in range(4)), index)
    for seed in range(10):
        inner = kv_aware({}, random.Random(seed)).choose(request, view)
        assert decider(seed).choose(request, view) == inner


def test_dispatch_feeds_the_inner_policy_the_prefill_side() -> None:
    # Approximate mode: the inner kv_aware remembers what it sent to the prefill backend, so a
    # repeat of the prompt is predicted to hit there and splits with a cheap prefill.
    request = prompt(8000)
    backends = (backend("p0", P, kv_events=False), backend("p1", P, kv_events=False),
                backend("d0", D, kv_events=False, in_flight_prompt_tokens=30000,
                        in_flight_requests=4))
    view = ClusterView(0.0, backends, PrefixIndex())
    policy = decider(3)
    first = policy.choose(request, view)
    assert first.prefill_backend_id in ("p0", "p1")
    policy.on_dispatched(request, first, 0.0)
    policy.on_finished(request, first, 1.0, True)
    second = policy.choose(request, ClusterView(1.0, backends, PrefixIndex()))
    assert second.prefill_backend_id == first.prefill_backend_id
    assert second.predicted_hit_tokens == (8000 - 1) // BS * BS


def test_choose_does_not_change_later_answers() -> None:
    index = PrefixIndex()
    request = prompt(8000)
    hold(index, "p0", request.block_hashes[:440])
    view = ClusterView(0.0, (backend("p0", P), backend("p1", P), backend("d0", D),
                             backend("d1", D)), index)
    a, b = decider(7), decider(7)
    for _ in range(3):
        a.choose(request, view)
    b.choose(request, view)
    b.choose(request, view)
    b.choose(request, view)
    assert a.choose(request, view) == b.choose(request, view)


@pytest.mark.parametrize(
    ("params", "path"),
    [({"network_bytes_per_s": 0}, "disaggregation"),
     ({"kv_knee_ratio": 1.0}, "disaggregation"),
     ({"min_uncached_tokens": "many"}, "disaggregation.min_uncached_tokens"),
     ({"bandwidth": 1}, "disaggregation.bandwidth")],
    ids=["zero-bandwidth", "knee-at-one", "not-a-number", "unknown-key"])
def test_bad_params_name_the_key(params: dict[str, object], path: str) -> None:
    with pytest.raises(ParamError) as info:
        wrap(build_policy("round_robin", {}, random.Random(0)), params, random.Random(0))
    assert info.value.path == path


def test_wraps_a_policy_without_ttft_scores() -> None:
    # round_robin gives no scores: the decider falls back to a bare prefill-time estimate.
    rng = random.Random(0)
    policy = wrap(build_policy("round_robin", {}, rng), {}, rng)
    view = ClusterView(0.0, (backend("p0", P), backend("d0", D)), None)
    assert policy.choose(prompt(300), view).prefill_backend_id is None
    long = policy.choose(prompt(8000), view)
    assert long.backend_id == "d0" and "local" in long.reason
    assert DisaggregationParams().transfer_s(8000) == pytest.approx(
        0.002 + 8000 * 131072 / 25e9)


class _CountingIndex:
    """A real PrefixIndex behind the read-only lookup a policy sees, counting chain walks."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self.matches = 0

    def match(self, block_hashes: Sequence[int], now_s: float | None = None) -> object:
        self.matches += 1
        return self.index.match(block_hashes, now_s)

    def backend_entries(self, backend_id: str) -> int:
        return self.index.backend_entries(backend_id)

    def shared_prefix(self, block_hashes: Sequence[int]) -> int:
        return self.index.shared_prefix(block_hashes)


def test_a_disaggregated_decision_matches_the_index_once() -> None:
    # The decider asks kv_aware twice (prefill side, then local prefill on DECODE backends);
    # both asks must share one walk of the chain, and still see what each backend holds.
    index = PrefixIndex()
    request = prompt(8000)
    hold(index, "p0", request.block_hashes[:440])
    hold(index, "d0", request.block_hashes[:100])
    counting = _CountingIndex(index)
    view = ClusterView(0.0, (backend("p0", P), backend("d0", D)), counting)  # type: ignore[arg-type]
    decision = decider().choose(request, view)
    assert counting.matches == 1
    matched = {s.backend_id: s.matched_tokens for s in decision.scores if s.decode is None}
    assert matched == {"p0": 440 * BS, "d0": 100 * BS}
