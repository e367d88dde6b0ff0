"""Disaggregated fleets in the cluster simulator: determinism, conservation, transfer costs and
the ``kvrouter simulate --prefill-backends`` front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvrouter.cli import main
from simulator.cluster import SimConfig
from simulator.sim_disagg import DisaggClusterSim, simulate_disagg
from simulator.sweep import open_trace

TRACE = "synthetic:long_doc_qa,requests=40,rate=8,documents=6"
CONFIG = SimConfig(backends=6, seed=1)


def run(prefill: int, **disagg: Any) -> tuple[dict[str, Any], DisaggClusterSim]:
    sim = DisaggClusterSim(CONFIG, "kv_aware", prefill, disagg_params=disagg)
    return sim.run(open_trace(TRACE, 1)), sim


def test_same_seed_same_numbers() -> None:
    a = simulate_disagg(CONFIG, "kv_aware", 2, open_trace(TRACE, 1))
    b = simulate_disagg(CONFIG, "kv_aware", 2, open_trace(TRACE, 1))
    for summary in (a, b):
        summary.pop("wall_s", None)
    assert a == b


@pytest.mark.parametrize("prefill", [0, 2])
def test_every_request_finishes_once(prefill: int) -> None:
    summary, sim = run(prefill)
    assert summary["requests"] == 40 and summary["failed"] == 0
    assert summary["split_requests"] + summary["local_requests"] == 40
    if prefill == 0:
        assert summary["split_requests"] == 0
        assert summary["policy"] == "kv_aware mixed"
    else:
        assert summary["policy"] == "kv_aware 2P+4D"
    assert sim.router.in_flight() == 0


def test_unconditional_split_prefills_on_prefill_engines_only() -> None:
    summary, sim = run(2, conditional=False)
    assert summary["split_requests"] == 40
    prefill, decode = sim.engines[:2], sim.engines[2:]
    # Prefill engines produced one token per request; decode engines every client token.
    assert sum(e.generation_tokens_total for e in prefill) == 40
    assert sum(e.generation_tokens_total for e in decode) == sim.metrics.output_tokens
    # The KV landed in the decode engines' caches: they hit (almost) the whole prompt.
    hits = sum(e.prefix_cache_hits_tokens for e in decode)
    queried = sum(e.prefix_cache_queries_tokens for e in decode)
    assert hits / queried > 0.95
    assert summary["transfer_tokens"] > 0 and summary["transfer_s_mean"] > 0


def test_a_slow_network_costs_ttft_and_turns_splits_local() -> None:
    fast, _ = run(2, conditional=False)
    slow, _ = run(2, conditional=False, network_bytes_per_s=1e9)
    assert slow["ttft_p50_s"] > fast["ttft_p50_s"]
    conditional_fast, _ = run(2)
    conditional_slow, _ = run(2, network_bytes_per_s=1e8)
    assert conditional_slow["split_requests"] < conditional_fast["split_requests"] or (
        conditional_fast["split_requests"] == 0)
    assert conditional_slow["split_requests"] == 0


def test_simulate_cli_sweeps_prefill_counts(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text("disaggregation:\n  min_uncached_tokens: 256\n")
    code = main(["simulate", "--trace", TRACE, "--backends", "6", "--policies", "kv_aware",
                 "--prefill-backends", "0,2", "--config", str(config), "--out",
                 str(tmp_path / "out"), "--jobs", "1", "--quiet"])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = results["results"] if isinstance(results, dict) else results
    assert [r["policy"] for r in runs] == ["kv_aware mixed", "kv_aware 2P+4D"]
    assert runs[1]["disaggregation"]["min_uncached_tokens"] == 256
    assert "kv_aware 2P+4D" in capsys.readouterr().out
    assert main(["simulate", "--trace", TRACE, "--backends", "6", "--prefill-backends", "6",
                 "--out", str(tmp_path / "bad")]) == 2
