"""The engine model's scheduler and cost model: cached-token rules, chunked prefill, admission
limited by blocks and max_num_seqs, preemption, determinism, and the cost formulas."""

from __future__ import annotations

import pytest

from policies.kv.events import BlockStored
from simulator.engine.cost_model import CostModel, load_cost_model, prefill_seconds, profile_names
from simulator.engine.model import EngineConfig, EngineModel, EngineRequest, StepResult

BS = 16
COST = load_cost_model("h200-llama-3.1-8b")


def keys_for(prefix: int, blocks: int, start: int = 0) -> tuple[int, ...]:
    return tuple(prefix * 1000 + i for i in range(start, start + blocks))


def run(engine: EngineModel, now: float = 0.0) -> tuple[float, list[StepResult]]:
    results = []
    for _ in range(100_000):
        result = engine.step(now)
        if result is None:
            return now, results
        assert result.end_s > result.start_s == now
        now = result.end_s
        results.append(result)
    raise AssertionError("engine did not drain")


def first_outputs(results: list[StepResult]) -> dict[str, int]:
    return {o.request_id: o.cached_tokens for r in results for o in r.outputs if o.first_token}


def test_repeated_prefix_hits_and_last_token_is_never_cached() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=64), COST)
    # 48 tokens = exactly 3 full blocks: a repeat may reuse only 2 (the last token is recomputed).
    engine.add_request(EngineRequest("a", 48, 2, keys_for(1, 3)), 0.0)
    now, res_a = run(engine)
    engine.add_request(EngineRequest("b", 48, 2, keys_for(1, 3)), now)
    now, res_b = run(engine, now)
    engine.add_request(EngineRequest("c", 60, 2, keys_for(1, 3)), now)
    now, res_c = run(engine, now)
    assert first_outputs(res_a) == {"a": 0}
    assert first_outputs(res_b) == {"b": 32}
    assert first_outputs(res_c) == {"c": 48}
    # A hit emits nothing; only a's first computation stored blocks.
    assert [e for r in res_b + res_c for e in r.events] == []
    stored = [e for r in res_a for e in r.events]
    assert stored == [BlockStored(keys_for(1, 3), None, (), BS)]
    assert engine.prefix_cache_queries_tokens == 48 + 48 + 60
    assert engine.prefix_cache_hits_tokens == 32 + 48


def test_full_report_mode_reannounces_hit_blocks() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=64), COST)
    tokens = tuple(range(48))
    engine.add_request(EngineRequest("a", 48, 1, keys_for(6, 3), tokens), 0.0)
    now, _ = run(engine)
    engine.add_request(EngineRequest("quiet", 48, 1, keys_for(6, 3), tokens), now)
    now, quiet = run(engine, now)
    engine.add_request(EngineRequest("loud", 48, 1, keys_for(6, 3), tokens, True), now)
    _, loud = run(engine, now)
    assert [e for r in quiet for e in r.events] == []
    assert [e for r in loud for e in r.events] == [
        BlockStored(keys_for(6, 2), None, tokens[:32], BS)
    ]


def test_cache_hit_makes_the_prefill_cheaper() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=2048), COST)
    engine.add_request(EngineRequest("cold", 8000, 1, keys_for(2, 500)), 0.0)
    now, cold = run(engine)
    engine.add_request(EngineRequest("warm", 8000, 1, keys_for(2, 500)), now)
    _, warm = run(engine, now)
    assert sum(r.duration_s for r in warm) < sum(r.duration_s for r in cold) / 5


def test_chunked_prefill_respects_the_token_budget() -> None:
    engine = EngineModel(
        EngineConfig(block_size=BS, num_gpu_blocks=64, max_num_batched_tokens=32), COST
    )
    engine.add_request(EngineRequest("a", 100, 3, keys_for(3, 6)), 0.0)
    _, results = run(engine)
    assert [r.prefill_tokens for r in results] == [32, 32, 32, 4, 0, 0]
    firsts = [i for i, r in enumerate(results) if any(o.first_token for o in r.outputs)]
    assert firsts == [3]
    # Blocks are stored as prefill chunks complete them.
    stored = [len(e.block_hashes) for r in results for e in r.events]
    assert stored == [2, 2, 2]
    finished = [o for r in results for o in r.outputs if o.finished]
    assert [(o.request_id, o.output_tokens) for o in finished] == [("a", 3)]
    assert engine.generation_tokens_total == 3


def test_decode_tokens_are_reported_once_each() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=64), COST)
    engine.add_request(EngineRequest("a", 20, 5, ()), 0.0)
    engine.add_request(EngineRequest("b", 20, 1, ()), 0.0)
    _, results = run(engine)
    tokens: dict[str, int] = {}
    for r in results:
        for rid in [o.request_id for o in r.outputs] + list(r.decoded):
            tokens[rid] = tokens.get(rid, 0) + 1
    assert tokens == {"a": 5, "b": 1}
    assert results[0].outputs[1].first_token and results[0].outputs[1].finished


def test_admission_waits_for_free_blocks() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=10), COST)
    engine.add_request(EngineRequest("a", 100, 10, ()), 0.0)  # 7 blocks, 8 with decode
    engine.add_request(EngineRequest("b", 100, 10, ()), 0.0)
    first = engine.step(0.0)
    assert first is not None
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    assert engine.kv_usage_ratio == pytest.approx(0.7)
    _, results = run(engine, first.end_s)
    assert engine.num_preemptions == 0
    done = [o.request_id for r in results for o in r.outputs if o.finished]
    assert done == ["a", "b"]


def test_max_num_seqs_caps_the_batch() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=100, max_num_seqs=2), COST)
    for i in range(5):
        engine.add_request(EngineRequest(f"r{i}", 10, 3, ()), 0.0)
    engine.step(0.0)
    assert (engine.num_running, engine.num_waiting) == (2, 3)


def test_preemption_when_decode_runs_out_of_blocks() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=8), COST)
    # Each needs 2 blocks to start and 5 by the end: three admitted, then decode starves.
    for i in range(3):
        engine.add_request(EngineRequest(f"r{i}", 20, 60, keys_for(10 + i, 1)), 0.0)
    _, results = run(engine)
    assert engine.num_preemptions > 0
    assert any(r.preempted for r in results)
    done = {o.request_id: o.output_tokens for r in results for o in r.outputs if o.finished}
    assert done == {"r0": 60, "r1": 60, "r2": 60}
    assert engine.cache.used_blocks == 0
    assert engine.generation_tokens_total == 180


def test_output_blocks_with_keys_are_cached_as_decoding_fills_them() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=64), COST)
    keys = keys_for(5, 4)  # 2 prompt blocks + 2 blocks of the 40-token output
    engine.add_request(EngineRequest("a", 32, 40, keys), 0.0)
    now, results = run(engine)
    stored = [e.block_hashes for r in results for e in r.events]
    assert stored == [keys[:2], keys[2:3], keys[3:4]]
    parents = [e.parent_block_hash for r in results for e in r.events if isinstance(e, BlockStored)]
    assert parents == [None, keys[1], keys[2]]
    # The next turn repeats prompt + answer and goes on: it hits the answer's blocks too.
    engine.add_request(EngineRequest("b", 80, 1, keys), now)
    _, results = run(engine, now)
    assert first_outputs(results) == {"b": 64}


def test_abort_frees_blocks() -> None:
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=16), COST)
    engine.add_request(EngineRequest("a", 64, 100, keys_for(4, 4)), 0.0)
    engine.add_request(EngineRequest("b", 64, 100, ()), 0.0)
    engine.step(0.0)
    assert engine.abort("a") and engine.abort("b")
    assert not engine.abort("a")
    assert engine.cache.used_blocks == 0 and not engine.has_work
    assert engine.cached_keys() == set(keys_for(4, 4))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (EngineRequest("x", 100, 10**6), "max_model_len"),
        (EngineRequest("x", 5000, 10), "KV blocks"),
        (EngineRequest("x", 0, 10), ">= 1"),
        (EngineRequest("x", 20, 10, (1, 2)), "prompt \\+ max_tokens"),
    ],
    ids=["too-long", "never-fits", "empty", "too-many-keys"],
)
def test_add_request_rejects(request_: EngineRequest, message: str) -> None:
    engine = EngineModel(
        EngineConfig(block_size=BS, num_gpu_blocks=100, max_model_len=100_000), COST
    )
    with pytest.raises(ValueError, match=message):
        engine.add_request(request_, 0.0)


def test_same_inputs_same_results() -> None:
    def once() -> list[tuple[float, tuple[object, ...], tuple[object, ...]]]:
        engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=40), COST)
        for i in range(12):
            engine.add_request(EngineRequest(f"r{i}", 50 + 7 * i, 20, keys_for(i % 3, 3)), 0.0)
        _, results = run(engine)
        return [(r.end_s, r.outputs, r.events) for r in results]

    assert once() == once()


def test_prefill_formula_matches_the_documented_coefficients() -> None:
    coefficients = COST.prefill_coefficients()
    assert set(coefficients) == {
        "prefill_linear_s_per_token",
        "prefill_attention_s_per_token2",
        "step_floor_s",
    }
    n, m = 3000, 5000
    expected = (
        coefficients["step_floor_s"]
        + coefficients["prefill_linear_s_per_token"] * n
        + coefficients["prefill_attention_s_per_token2"] * n * (n + 2 * m)
    )
    assert COST.step_s([(n, m)], 0) == pytest.approx(expected)
    assert prefill_seconds(
        n,
        m,
        coefficients["prefill_linear_s_per_token"],
        coefficients["prefill_attention_s_per_token2"],
        coefficients["step_floor_s"],
    ) == pytest.approx(expected)
    # The calibration README: an 8k prompt costs ~0.25 s from scratch on this profile.
    assert 0.2 < COST.step_s([(8192, 0)], 0) < 0.32


def test_decode_cost_grows_with_total_context_and_uses_the_served_floor() -> None:
    small = COST.step_s([], 512)
    assert small == pytest.approx(COST.step_floor_s)
    assert COST.step_floor_s < 0.01  # not the eager ~20 ms framework floor
    values = [COST.step_s([], t) for t in (512, 65536, 131072, 262144, 524288)]
    assert values == sorted(values) and values[-1] > values[0]


def test_profiles_load_and_bad_ones_are_refused() -> None:
    assert {"h200-llama-3.1-8b", "h200-llama-3.2-1b", "h200-qwen3-32b-shape", "cpu-tiny"} <= set(
        profile_names()
    )
    for name in profile_names():
        assert load_cost_model(name).num_gpu_blocks(16) > 0
    with pytest.raises(ValueError, match="unknown cost profile"):
        load_cost_model("no-such-profile")
    with pytest.raises(ValueError, match="step_floor_s"):
        CostModel.from_mapping({"decode_rows": [{"batch": 1, "context": 1, "seconds": 1}]})


def test_a_request_admitted_in_the_same_step_hits_the_blocks_scheduled_before_it() -> None:
    # vLLM v1 caches a prefill's blocks when it schedules them, so two same-prefix requests
    # arriving together compute the shared prefix once (the second hits it in that step).
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=64), COST)
    engine.add_request(EngineRequest("a", 40, 1, keys_for(2, 2)), 0.0)
    engine.add_request(EngineRequest("b", 40, 1, keys_for(2, 2)), 0.0)
    first = engine.step(0.0)
    assert first is not None
    assert first_outputs([first]) == {"a": 0, "b": 32}
    assert first.prefill_tokens == 40 + 8
    assert engine.prefix_cache_hits_tokens == 32
    # One copy of the blocks, announced once, before b shares them.
    assert [e for e in first.events if isinstance(e, BlockStored)] == [
        BlockStored(keys_for(2, 2), None, (), BS)]


def test_a_request_never_joins_a_step_that_began_before_it_arrived() -> None:
    # Two cold requests handed to an idle engine before it runs, the second 5 ms after the
    # first: a free-running engine core starts at the first arrival with the first alone, and
    # the second waits for the next step (it used to share the first step, both first tokens
    # at its end).
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=256), COST)
    engine.add_request(EngineRequest("a", 1024, 2, keys_for(1, 64)), 1.000)
    engine.add_request(EngineRequest("b", 1024, 2, keys_for(2, 64)), 1.005)
    assert engine.next_step_s(0.0) == 1.000  # idle: when the first request arrived
    first = engine.step(engine.next_step_s(0.0))
    assert first is not None and first.prefill_tokens == 1024
    assert engine.next_step_s(first.end_s) == first.end_s  # busy: right after the last step
    now, rest = run(engine, first.end_s)
    firsts = {o.request_id: r.end_s for r in [first, *rest] for o in r.outputs if o.first_token}
    assert firsts["a"] == first.end_s < firsts["b"]
    # Requests arriving at the same instant still share a step.
    engine.add_request(EngineRequest("c", 512, 2, keys_for(3, 32)), now + 1)
    engine.add_request(EngineRequest("d", 512, 2, keys_for(4, 32)), now + 1)
    together = engine.step(engine.next_step_s(now))
    assert together is not None and together.prefill_tokens == 1024
