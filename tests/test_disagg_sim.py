"""Disaggregated fleets in the cluster simulator: determinism, conservation, transfer costs and
the ``kvrouter simulate --prefill-backends`` front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvrouter.cli import main
from simulator.cluster import SimConfig
from simulator.disagg import DisaggClusterSim, simulate_disagg
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


def test_router_and_simulator_make_the_same_split_decisions() -> None:
    # The same decider over the live pool's snapshot and the simulator's router: same views,
    # same seeds, same decisions, request after request.
    import random

    from policies.disaggregation import wrap
    from policies.kv.hashing import BlockHasher, Namespace
    from policies.registry import build_policy
    from policies.types import ClusterView, Role, RouteRequest
    from router.pool import BackendPool
    from simulator.disagg import _RoleRouter

    roles = (Role.PREFILL, Role.PREFILL, Role.DECODE, Role.DECODE, Role.DECODE)

    def policy() -> Any:
        rng = random.Random(11)
        return wrap(build_policy("kv_aware", {}, rng), {}, rng)

    sim = _RoleRouter(roles, policy=policy(), kv_events=False)
    pool = BackendPool()
    for i, role in enumerate(roles):
        pool.add(f"engine-{i}", role=role)
    live = policy()
    hasher = BlockHasher(Namespace("m"), 16)
    decisions = []
    for n in range(30):
        tokens = 600 + 700 * (n % 9)
        ids = [(n % 4) * 100_003 + i for i in range(tokens)]
        request = RouteRequest(f"r{n}", "m", tokens, block_hashes=hasher.hash_tokens(ids),
                               tokens_exact=True, max_tokens=64)
        now_s = float(n)
        view = ClusterView(now_s, pool.snapshot("m", now_s), None)
        assert view.backends == sim.snapshot(now_s)
        expected = sim.route(request, now_s)
        got = live.choose(request, view)
        assert got == expected
        # The live proxy's bookkeeping for the same decision.
        if got.prefill_backend_id is not None:
            pool.acquire(got.prefill_backend_id, tokens, now_s)
        pool.acquire(got.backend_id, 0 if got.prefill_backend_id else tokens, now_s)
        live.on_dispatched(request, got, now_s)
        decisions.append(got.prefill_backend_id is not None)
    assert any(decisions) and not all(decisions)
