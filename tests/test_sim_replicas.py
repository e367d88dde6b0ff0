"""``kvrouter simulate --routers R``: router replicas in the cluster simulator, with and
without replica sync; determinism, the one-router path untouched, divergence figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvrouter.cli import main
from simulator.cluster import SimConfig, simulate
from simulator.replicas import ReplicaConfig
from simulator.workloads import parse_synthetic, synthetic

TRACE = "synthetic:multi_tenant,requests=600,rate=20"


def run(replicas: ReplicaConfig | None, seed: int = 0) -> dict[str, Any]:
    name, params = parse_synthetic(TRACE)
    result = simulate(SimConfig(backends=6, seed=seed), "kv_aware", synthetic(name, params, seed),
                      replicas=replicas)
    result.pop("wall_s")
    return result


def test_one_router_through_the_replica_path_is_the_plain_run() -> None:
    assert run(ReplicaConfig(routers=1)) == run(None)


def test_replicas_are_deterministic() -> None:
    config = ReplicaConfig(routers=4, sync=True, sync_loss_ratio=0.05)
    assert run(config) == run(config)


@pytest.mark.parametrize("routers", [2, 4])
def test_sync_gives_each_replica_the_fleets_view_and_off_a_share(routers: int) -> None:
    on = run(ReplicaConfig(routers=routers, sync=True))
    off = run(ReplicaConfig(routers=routers, sync=False))
    assert on["routers"] == off["routers"] == routers
    assert on["in_flight_seen_ratio"] > 0.97
    assert off["in_flight_seen_ratio"] == pytest.approx(1 / routers, abs=0.15)
    assert sum(r["requests"] for r in on["replicas"]) == on["requests"] == 600
    assert all(r["requests"] > 0 for r in on["replicas"])
    assert on["sync_messages"] > 0 and off["sync_messages"] == 0


def test_lost_sync_messages_are_counted_and_seen_by_receivers() -> None:
    lossy = run(ReplicaConfig(routers=4, sync=True, sync_loss_ratio=0.2))
    assert 0.15 < lossy["sync_lost"] / lossy["sync_messages"] < 0.25
    assert sum(r["sync_dropped"] for r in lossy["replicas"]) > 0
    # A lost state is replaced by the sender's next one: the view stays near the truth.
    assert lossy["in_flight_seen_ratio"] > 0.7


def test_cli_sweeps_routers_and_sync(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["simulate", "--trace", "synthetic:multi_tenant,requests=200", "--backends", "4",
                 "--policies", "kv_aware", "--routers", "1,2", "--sync", "on,off", "--out",
                 str(out), "--jobs", "1", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r.get("routers"), r.get("sync")) for r in results] == [
        (None, None), (2, True), (2, False)]
    assert "label" not in results[0] and results[1]["label"] == "R=2 sync on"
    assert "seen (x)" in capsys.readouterr().out
    assert "R=2 sync off" in (out / "report.html").read_text()
    assert main(["simulate", "--trace", "synthetic:multi_tenant,requests=20", "--policies",
                 "kv_aware", "--routers", "2", "--sync", "maybe", "--out", str(out)]) == 2
