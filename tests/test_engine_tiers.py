"""KV tiers below HBM in the engine model (issue 18): vLLM-native CPU offloading (write-through
on compute, LRU, H2D load instead of recompute, "CPU"-medium events) and a fleet-shared store
(loadable by every engine at the store's bandwidth, "REMOTE" events), replayed into the index."""

from __future__ import annotations

import pytest

from policies.kv.events import REMOTE, BlockRemoved, BlockStored, KvEvent
from policies.kv.index import PrefixIndex
from simulator.engine.cost_model import load_cost_model
from simulator.engine.model import EngineConfig, EngineModel, EngineRequest, StepResult
from simulator.engine.tiers import BlockLru, SharedStore

BS = 16
COST = load_cost_model("h200-llama-3.1-8b")


def keys_for(prefix: int, blocks: int) -> tuple[int, ...]:
    return tuple(prefix * 1000 + i for i in range(blocks))


def run(engine: EngineModel, now: float = 0.0) -> tuple[float, list[StepResult]]:
    results = []
    for _ in range(100_000):
        result = engine.step(now)
        if result is None:
            return now, results
        assert result.end_s >= result.start_s == now
        now = result.end_s
        results.append(result)
    raise AssertionError("engine did not drain")


def first_token(results: list[StepResult], request_id: str) -> tuple[float, int, int, int]:
    for r in results:
        for o in r.outputs:
            if o.request_id == request_id and o.first_token:
                return r.end_s, o.cached_tokens, o.cpu_cached_tokens, o.shared_cached_tokens
    raise AssertionError(f"no first token for {request_id}")


def events_of(results: list[StepResult]) -> list[KvEvent]:
    return [e for r in results for e in r.events]


def evict_a_then_return(cpu_blocks: int) -> tuple[EngineModel, list[StepResult], float]:
    """a (64 blocks) runs, b (70 blocks) evicts it all from a 70-block HBM, a comes back."""
    engine = EngineModel(
        EngineConfig(block_size=BS, num_gpu_blocks=70, cpu_offload_blocks=cpu_blocks), COST)
    prompt = 64 * BS
    engine.add_request(EngineRequest("a", prompt, 1, keys_for(1, 64)), 0.0)
    now, _ = run(engine)
    engine.add_request(EngineRequest("b", 70 * BS - 1, 1, keys_for(2, 69)), now)
    now, _ = run(engine, now)
    engine.add_request(EngineRequest("a2", prompt + 1, 1, keys_for(1, 64)), now)
    start = now
    _, results = run(engine, now)
    return engine, results, start


def test_cpu_offload_turns_a_gpu_eviction_into_an_h2d_load() -> None:
    _, cold_results, cold_start = evict_a_then_return(cpu_blocks=0)
    warm, warm_results, warm_start = evict_a_then_return(cpu_blocks=1000)
    cold_end, cold_cached, _, _ = first_token(cold_results, "a2")
    warm_end, warm_cached, warm_cpu, _ = first_token(warm_results, "a2")
    assert cold_cached == 0  # HBM alone: evicted, recomputed
    assert (warm_cached, warm_cpu) == (64 * BS, 64 * BS)
    load_s = 64 * BS * COST.kv_bytes_per_token / COST.h2d_bytes_per_s
    assert load_s == pytest.approx(64 * BS * 131072 / 55.2e9)
    # TTFT = the queued load, then one step computing the last token (not a recompute).
    one_token_s = COST.step_s([(1, 64 * BS)], 0)
    assert warm_end - warm_start == pytest.approx(load_s + one_token_s)
    assert cold_end - cold_start > 5 * (warm_end - warm_start)
    assert warm.cpu_hit_tokens == 64 * BS and warm.prefix_cache_hits_tokens == 0
    # The load stores the blocks on GPU again (GPU medium); the CPU copies stay.
    gpu_stored = [e for e in events_of(warm_results)
                  if isinstance(e, BlockStored) and e.medium == "GPU"]
    assert [k for e in gpu_stored for k in e.block_hashes][:64] == list(keys_for(1, 64))
    assert warm.cpu is not None and set(keys_for(1, 64)) <= warm.cpu.keys()


def test_cpu_tier_is_written_through_with_vllm_placeholder_events() -> None:
    engine = EngineModel(
        EngineConfig(block_size=BS, num_gpu_blocks=64, cpu_offload_blocks=4), COST)
    engine.add_request(EngineRequest("a", 6 * BS + 1, 1, keys_for(3, 6)), 0.0)
    _, results = run(engine)
    events = events_of(results)
    assert events[0] == BlockStored(keys_for(3, 6), None, (), BS)  # GPU, vLLM's shape
    # Written through as computed (not on eviction): hashes only, block_size 0, medium CPU;
    # the 4-block LRU drops the two least recent (the chain's tail goes first).
    assert events[1] == BlockStored(keys_for(3, 6), None, (), 0, medium="CPU")
    assert events[2:] == [BlockRemoved((3005,), medium="CPU"), BlockRemoved((3004,), medium="CPU")]


def test_shared_store_lets_another_engine_load_at_network_bandwidth() -> None:
    store = SharedStore(capacity_blocks=10_000, block_size=BS)
    config = EngineConfig(block_size=BS, num_gpu_blocks=256)
    writer = EngineModel(config, COST, "engine-0", shared=store)
    reader = EngineModel(config, COST, "engine-1", shared=store)
    writer.add_request(EngineRequest("w", 100 * BS, 1, keys_for(4, 100)), 0.0)
    now, w_results = run(writer)
    remote = [e for e in events_of(w_results) if getattr(e, "locality", None) == REMOTE]
    assert remote == [BlockStored(keys_for(4, 100), None, (), 0, medium="STORAGE",
                                  locality=REMOTE)]
    reader.add_request(EngineRequest("r", 100 * BS + 1, 1, keys_for(4, 100)), now)
    _, r_results = run(reader, now)
    end, cached, cpu, shared = first_token(r_results, "r")
    assert (cached, cpu, shared) == (100 * BS, 0, 100 * BS)
    load_s = 100 * BS * COST.kv_bytes_per_token / COST.shared_store_bytes_per_s
    assert end - now == pytest.approx(load_s + COST.step_s([(1, 100 * BS)], 0))
    assert COST.shared_store_bytes_per_s < COST.h2d_bytes_per_s  # network is slower than PCIe


def test_loads_queue_on_one_link_and_other_requests_keep_running() -> None:
    store = SharedStore(capacity_blocks=10_000, block_size=BS)
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=1024), COST, shared=store)
    events: list[KvEvent] = []
    store.store(keys_for(5, 200) + keys_for(6, 200), events)
    engine.add_request(EngineRequest("x", 200 * BS + 1, 1, keys_for(5, 200)), 0.0)
    engine.add_request(EngineRequest("y", 200 * BS + 1, 1, keys_for(6, 200)), 0.0)
    engine.add_request(EngineRequest("cold", 64, 1), 0.0)
    _, results = run(engine)
    load_s = 200 * BS * COST.kv_bytes_per_token / COST.shared_store_bytes_per_s
    x_end = first_token(results, "x")[0]
    y_end = first_token(results, "y")[0]
    cold_end = first_token(results, "cold")[0]
    assert cold_end < load_s  # not held up by the loads
    assert x_end >= load_s and y_end >= 2 * load_s  # y's load waited for x's
    waits = [r for r in results if r.load_wait]
    assert waits and all(r.prefill_tokens == 0 and not r.outputs for r in waits)


def loaded_or_cold_beside_a_decode(from_cpu: bool) -> EngineModel:
    """A 60-block decode leaves 40 of 100 HBM blocks free; then a 50-block prompt arrives,
    either held in the CPU tier or cold, with 8-block prefill chunks."""
    engine = EngineModel(EngineConfig(block_size=BS, num_gpu_blocks=100, max_num_batched_tokens=8 * BS,
                                      cpu_offload_blocks=1000), COST)
    engine.add_request(EngineRequest("decode", 60 * BS, 300), 0.0)
    now = 0.0
    while engine.generation_tokens_total < 2:  # prefilled, now decoding
        result = engine.step(now)
        assert result is not None
        now = result.end_s
    assert engine.cache.free_blocks < 50
    if from_cpu:
        assert engine.cpu is not None
        engine.cpu.store(keys_for(7, 50), [])
    engine.add_request(EngineRequest("new", 50 * BS + 1, 1, keys_for(7, 50)), now)
    engine.step(now)
    return engine


def test_a_load_needs_hbm_for_its_whole_run_where_a_cold_prompt_needs_one_chunk() -> None:
    # vLLM allocates slots for every externally loaded token before the load starts; a cold
    # prompt is admitted with its first chunk. Where HBM is short, a CPU hit therefore waits
    # for running requests to finish while the same prompt cold would start at once
    # (docs/simulation.md, KV tiers: what sets the p99).
    assert loaded_or_cold_beside_a_decode(from_cpu=False).num_waiting == 0
    assert loaded_or_cold_beside_a_decode(from_cpu=True).num_waiting == 1


def test_tier_events_replayed_into_the_index_give_the_engine_tiers() -> None:
    store = SharedStore(capacity_blocks=10_000, block_size=BS)
    config = EngineConfig(block_size=BS, num_gpu_blocks=70, cpu_offload_blocks=1000)
    a = EngineModel(config, COST, "engine-0", shared=store)
    b = EngineModel(config, COST, "engine-1", shared=store)
    index = PrefixIndex()
    now = 0.0
    for engine, rid, prefix in ((a, "a", 1), (a, "b", 2), (b, "c", 3)):
        engine.add_request(EngineRequest(rid, 64 * BS, 1, keys_for(prefix, 64)), now)
        now, results = run(engine, now)
        for event in events_of(results):
            index.apply(engine.engine_id, event, now)
    found = index.match(keys_for(1, 64))
    # a's prefix: evicted from engine-0's HBM by b, on its CPU tier, and in the shared store.
    assert found["engine-0"].cpu_blocks == 64 - found["engine-0"].gpu_blocks > 0
    assert found["engine-0"].shared_blocks == 0
    assert (found["engine-1"].shared_blocks, found["engine-1"].matched_blocks) == (64, 64)
    assert index.shared_blocks == 3 * 64  # each shared block once, whoever wrote it


@pytest.mark.parametrize("capacity", [0, -1])
def test_tier_sizes_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity_blocks"):
        BlockLru(capacity, BS, "CPU")
    if capacity < 0:
        with pytest.raises(ValueError, match="cpu_offload_blocks"):
            EngineConfig(cpu_offload_blocks=capacity)
