"""Tiered clusters in the simulator (issue 18): `simulate --cpu-offload-tokens/--shared-store-tokens`,
hits per tier in results.json, the tiered oracle and floor, returning turns measured apart,
the new workloads, and results.json of runs without tiers left exactly as they were."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kvrouter.cli import main
from simulator.cluster import SimConfig, simulate
from simulator.inputs import config_dict
from simulator.results import PooledLruOracle, TieredOracle
from simulator.workloads import synthetic

# Long contexts coming back after minutes, on engines whose HBM holds ~20 contexts.
RETURNING = {"requests": 400, "rate": 4.0, "idle_s": 120.0, "return_ratio": 0.9,
             "prompt_min_tokens": 4000, "prompt_max_tokens": 8000, "block_size": 64}
SMALL = {"num_gpu_blocks": 2000, "scrape_interval_s": 0.5, "returning_gap_s": 60.0}


def run(policy: str, params: dict[str, object] | None = None, **config: object) -> dict[str, object]:
    cfg = SimConfig(backends=4, **{**SMALL, **config})  # type: ignore[arg-type]
    return simulate(cfg, policy, synthetic("returning", RETURNING, 3), params)


def test_tiers_turn_returning_users_recomputes_into_loads() -> None:
    gpu = run("kv_aware")
    cpu = run("kv_aware", cpu_offload_tokens=400_000)
    shared = run("kv_aware", shared_store_tokens=2_000_000)
    assert "cpu_hit_rate" not in gpu and "cpu_offload_tokens" not in gpu["config"]  # type: ignore[operator]
    for tiered, tier in ((cpu, "cpu_hit_rate"), (shared, "shared_hit_rate")):
        assert tiered[tier] > 0.05  # type: ignore[operator]
        parts = tiered["gpu_hit_rate"] + tiered["cpu_hit_rate"] + tiered["shared_hit_rate"]  # type: ignore[operator]
        assert parts == pytest.approx(tiered["hit_rate"])
        assert tiered["hit_rate"] > gpu["hit_rate"]  # type: ignore[operator]
        # The returning turns get their context back: TTFT well under a recompute's.
        assert tiered["returning_ttft_p50_s"] < 0.5 * gpu["returning_ttft_p50_s"]  # type: ignore[operator]
        # The oracle pools the same tiers: at least the HBM-only oracle, still a bound.
        assert tiered["oracle_hit_rate"] >= gpu["oracle_hit_rate"]  # type: ignore[operator]
        assert tiered["oracle_hit_rate"] >= tiered["hit_rate"] - 0.02  # type: ignore[operator]
        assert tiered["ttft_floor_p50_s"] <= gpu["ttft_floor_p50_s"]  # type: ignore[operator]
    assert gpu["returning_requests"] == cpu["returning_requests"] > 20  # type: ignore[operator]
    assert shared["index_shared_blocks"] > 0  # type: ignore[operator]
    assert shared["config"]["shared_store_tokens"] == 2_000_000  # type: ignore[index]


def test_with_a_shared_store_returning_turns_need_not_go_home() -> None:
    aware = run("kv_aware", shared_store_tokens=2_000_000)
    blind = run("kv_aware", {"tier_pricing": "gpu_only"}, shared_store_tokens=2_000_000)
    # Both load from the store; only the tier-aware policy knows every engine can.
    assert aware["returning_moved_ratio"] > blind["returning_moved_ratio"]  # type: ignore[operator]


def test_a_tiered_run_is_deterministic() -> None:
    a = run("kv_aware", cpu_offload_tokens=400_000, shared_store_tokens=1_000_000)
    b = run("kv_aware", cpu_offload_tokens=400_000, shared_store_tokens=1_000_000)
    a.pop("wall_s")
    b.pop("wall_s")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_config_dict_leaves_out_tiers_that_are_off() -> None:
    optional = {"cpu_offload_tokens", "shared_store_tokens", "returning_gap_s"}
    assert not optional & set(config_dict(SimConfig()))
    assert config_dict(SimConfig(cpu_offload_tokens=5))["cpu_offload_tokens"] == 5
    with pytest.raises(ValueError, match=r"simulation\.shared_store_tokens must be >= 0"):
        SimConfig(shared_store_tokens=-1)


def test_tiered_oracle_hits_what_hbm_evicted() -> None:
    flat, tiered = PooledLruOracle(2), TieredOracle(2, 2)
    for oracle in (flat, tiered):
        oracle.observe([1, 2], 1, 2)
        oracle.observe([3, 4], 1, 2)  # evicts 1, 2 from the top pool
    assert flat.observe([1, 2], 1, 2) == 0
    assert tiered.observe([1, 2], 1, 2) == 2 and tiered.last_lower_tokens == 2


@pytest.mark.parametrize("name", ["returning", "long_agent"])
def test_new_workloads_are_seeded_sessions(name: str) -> None:
    a = list(synthetic(name, {"requests": 300, "rate": 2.0}, 7))
    assert a == list(synthetic(name, {"requests": 300, "rate": 2.0}, 7))
    assert len(a) == 300 and all(r.session_id for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    if name == "long_agent":
        assert max(r.input_tokens for r in a) > 30_000
    else:  # some users come back after minutes
        by_session: dict[str, list[float]] = {}
        for r in a:
            by_session.setdefault(r.session_id or "", []).append(r.arrival_s)
        gaps = [b - x for t in by_session.values() for x, b in itertools.pairwise(t)]
        assert max(gaps) > 60


def test_simulate_cli_tier_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "--trace", "synthetic:returning,requests=80,rate=4,idle_s=30",
            "--backends", "2", "--policies", "kv_aware", "--out", str(out), "--quiet",
            "--jobs", "1", "--cpu-offload-tokens", "300000", "--shared-store-tokens", "900000"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "cpu hit (%)" in table and "shared hit (%)" in table
    [result] = json.loads((out / "results.json").read_text())
    assert result["config"]["cpu_offload_tokens"] == 300000
    assert result["config"]["shared_store_tokens"] == 900000
    assert {"gpu_hit_rate", "cpu_hit_rate", "shared_hit_rate"} <= set(result)
    assert main([*argv[:-4], "--cpu-offload-tokens", "-5"]) == 2
    assert "cpu_offload_tokens must be >= 0" in capsys.readouterr().err
