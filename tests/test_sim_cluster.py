"""Cluster simulator: hand-computed hit rates, determinism, conservation, the oracle bound,
stale-index knobs, and KV-aware routing beating the baselines on a multi-tenant workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulator.cluster import SimConfig, prompt_text_of, simulate
from simulator.results import PooledLruOracle
from simulator.traces import TraceRequest, load_jsonl
from simulator.workloads import parse_synthetic, synthetic

TINY = {"num_gpu_blocks": 64, "scrape_interval_s": 0.5}


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def hand_trace(tmp_path: Path) -> Path:
    # Block size 4. Engines always recompute the last token, so a 12-token prompt can reuse at
    # most (12 - 1) // 4 = 2 blocks.
    rows = [
        {
            "arrival_s": 0.0,
            "hash_ids": [1, 2, 3],
            "input_tokens": 12,
            "block_size": 4,
            "output_tokens": 3,
        },
        {
            "arrival_s": 10.0,
            "hash_ids": [1, 2, 4],
            "input_tokens": 12,
            "block_size": 4,
            "output_tokens": 3,
        },
        {
            "arrival_s": 20.0,
            "hash_ids": [5, 6],
            "input_tokens": 8,
            "block_size": 4,
            "output_tokens": 3,
        },
        {
            "arrival_s": 30.0,
            "hash_ids": [1, 2, 3, 7],
            "input_tokens": 16,
            "block_size": 4,
            "output_tokens": 3,
        },
    ]
    return _write(tmp_path / "hand.jsonl", rows)


@pytest.mark.parametrize(
    ("backends", "hit_tokens"),
    [
        # One engine: r1 reuses [1, 2] (8 tokens), r3 reuses [1, 2, 3] (12): 20 of 48.
        (1, 20),
        # Round robin over two: r0, r2 -> engine-0; r1, r3 -> engine-1, where r3 finds only
        # r1's [1, 2]: 8 of 48.
        (2, 8),
    ],
    ids=["one-engine", "two-engines-round-robin"],
)
def test_hand_computed_hit_rates(hand_trace: Path, backends: int, hit_tokens: int) -> None:
    config = SimConfig(backends=backends, cost_profile="cpu-tiny", **TINY)  # type: ignore[arg-type]
    result = simulate(config, "round_robin", load_jsonl(hand_trace))
    assert result["requests"] == 4
    assert result["input_tokens"] == 48
    assert result["hit_tokens"] == hit_tokens
    assert result["hit_rate"] == pytest.approx(hit_tokens / 48)
    # The pooled oracle sees everything in one cache: 8 (r1) + 12 (r3) whatever the routing.
    assert result["oracle_hit_rate"] == pytest.approx(20 / 48)
    assert result["routed"] == ([4] if backends == 1 else [2, 2])


def test_pooled_lru_oracle_evicts_least_recent() -> None:
    oracle = PooledLruOracle(capacity_blocks=3)
    assert oracle.observe([1, 2], 4, 8) == 0
    assert oracle.observe([1, 2], 4, 8) == 8
    assert oracle.observe([3, 4], 4, 8) == 0  # evicts 1 (least recent), keeps 2, 3, 4
    assert oracle.observe([1, 2], 4, 8) == 0  # the chain's head is gone: no prefix hit
    assert oracle.hit_rate == pytest.approx(8 / 32)


def _multi_tenant(requests: int = 400) -> tuple[str, object]:
    return parse_synthetic(
        f"synthetic:multi_tenant,requests={requests},rate=6,tenants=24,block_size=64"
    )


def _run(policy: str, seed: int = 0, requests: int = 400, **overrides: object) -> dict[str, object]:
    name, params = _multi_tenant(requests)
    config = SimConfig(backends=4, num_gpu_blocks=1500, seed=seed, **overrides)  # type: ignore[arg-type]
    return simulate(config, policy, synthetic(name, params, seed))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "policy", ["round_robin", "session_affinity", "kv_aware", "sglang_cache_aware"]
)
def test_deterministic_conserving_and_under_the_oracle(policy: str) -> None:
    first = _run(policy, seed=3, requests=150)
    second = _run(policy, seed=3, requests=150)
    for run in (first, second):
        run.pop("wall_s")  # the CLI moves it out of results.json
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    # Conservation: every arrival finished exactly once (the simulator also raises otherwise).
    assert first["arrived"] == first["requests"] + first["failed"] == 150
    assert sum(first["routed"]) == 150  # type: ignore[arg-type]
    assert first["hit_rate"] <= first["oracle_hit_rate"] + 1e-12  # type: ignore[operator]
    assert first["hit_tokens"] <= first["input_tokens"]  # type: ignore[operator]
    # No request beats its prompt prefilled alone with the oracle's hits.
    assert first["ttft_floor_p99_s"] <= first["ttft_p99_s"]  # type: ignore[operator]


def test_a_different_seed_changes_the_workload() -> None:
    one = _run("round_robin", seed=1, requests=50)
    assert one["input_tokens"] != _run("round_robin", seed=2, requests=50)["input_tokens"]


def test_kv_aware_beats_round_robin_and_session_affinity() -> None:
    kv = _run("kv_aware")
    for baseline in ("round_robin", "session_affinity"):
        other = _run(baseline)
        assert kv["hit_rate"] > other["hit_rate"] + 0.05, baseline  # type: ignore[operator]
        assert kv["ttft_p99_s"] < other["ttft_p99_s"], baseline  # type: ignore[operator]
    assert kv["hit_rate"] >= 0.9 * kv["oracle_hit_rate"]  # type: ignore[operator]


def test_lost_kv_events_starve_the_index_and_cost_hits() -> None:
    fresh = _run("kv_aware")
    blind = _run("kv_aware", event_loss_ratio=1.0)
    assert fresh["events_dropped"] == 0 and blind["events_delivered"] == 0
    assert blind["events_dropped"] > 0 and blind["index_entries"] == 0
    assert blind["hit_rate"] < fresh["hit_rate"]  # type: ignore[operator]


def test_delayed_events_still_arrive() -> None:
    delayed = _run("kv_aware", requests=100, event_delay_s=0.5)
    assert delayed["events_dropped"] == 0 and delayed["events_delivered"] > 0
    assert delayed["index_entries"] > 0


def test_prompt_text_shares_exactly_the_shared_blocks() -> None:
    a = TraceRequest("a", 0.0, 10, 1, (7, 8, 9), block_size=4)
    b = TraceRequest("b", 0.0, 12, 1, (7, 8, 10), block_size=4)
    ta, tb = prompt_text_of(a, 2), prompt_text_of(b, 2)
    assert len(ta) == 20 and len(tb) == 24
    assert ta[:16] == tb[:16]  # blocks 7 and 8, 4 tokens x 2 characters each
    assert ta[16:20] != tb[16:20]
    # Router hashes are unsigned 64-bit, invented Azure keys negative: both have a pattern.
    c = TraceRequest("c", 0.0, 8, 1, (2**64 - 1, -5), block_size=4)
    assert len(prompt_text_of(c, 2)) == 16


def test_too_long_requests_fail_cleanly(tmp_path: Path) -> None:
    rows = [
        {
            "arrival_s": 0.0,
            "hash_ids": list(range(1, 101)),
            "input_tokens": 400,
            "block_size": 4,
            "output_tokens": 2,
        },
        {"arrival_s": 1.0, "hash_ids": [1], "input_tokens": 4, "block_size": 4, "output_tokens": 2},
    ]
    config = SimConfig(backends=1, cost_profile="cpu-tiny", **TINY)  # type: ignore[arg-type]
    result = simulate(config, "round_robin", load_jsonl(_write(tmp_path / "long.jsonl", rows)))
    assert result["failed"] == 1 and result["requests"] == 1 and result["arrived"] == 2


def test_overload_holds_requests_in_the_router_and_saves_preemptions() -> None:
    # 4 engines with small KV under a burst: kv_aware holds requests in the router (late
    # binding) instead of letting engines admit what they will later preempt.
    def run(**params: object) -> dict[str, object]:
        name, synth = parse_synthetic(
            "synthetic:multi_tenant,requests=300,rate=60,tenants=24,block_size=64,"
            "output_min_tokens=200,output_max_tokens=400")
        config = SimConfig(backends=4, num_gpu_blocks=300, seed=1)
        return simulate(config, "kv_aware", synthetic(name, synth, 1), params)  # type: ignore[arg-type]

    held, unheld = run(), run(hold_kv_ratio=0.0, hold_queue_s=0.0)
    assert held["deferred"] > 0 and held["max_held"] > 0  # type: ignore[operator]
    assert unheld["deferred"] == 0
    assert held["arrived"] == held["requests"] + held["failed"] == 300
    assert held["preemptions"] < unheld["preemptions"]  # type: ignore[operator]


def test_a_slow_backend_computes_slower_and_kv_aware_sends_it_less() -> None:
    name, synth = parse_synthetic("synthetic:multi_tenant,requests=400,rate=40,tenants=16")
    slow = SimConfig(backends=4, seed=2, slow_backends=((0, 4.0),))
    rr = simulate(slow, "round_robin", synthetic(name, synth, 2))
    busy = rr["busy_s"]
    # Round robin sends each engine the same work: the slow one is busy about 4x as long.
    assert busy[0] > 2.5 * max(busy[1:])  # type: ignore[index,operator]
    kv = simulate(slow, "kv_aware", synthetic(name, synth, 2))
    routed = kv["routed"]
    assert routed[0] < 0.7 * min(routed[1:])  # type: ignore[index,operator]
    assert kv["config"]["slow_backends"] == ((0, 4.0),)  # type: ignore[index]
    plain = simulate(SimConfig(backends=4, seed=2), "round_robin", synthetic(name, synth, 2))
    assert "slow_backends" not in plain["config"]  # type: ignore[operator]
    with pytest.raises(ValueError, match="slow_backends"):
        SimConfig(backends=4, slow_backends=((4, 2.0),))
