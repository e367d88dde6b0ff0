"""bench/quality.py cannot rot: its workload generator and table on small cases, and one live
cell (kvrouter round_robin in front of 2 emulated pods, real processes) with a handful of
requests."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
import quality_workload as workload  # noqa: E402


def test_base_workload_is_groups_of_shared_prefixes_shuffled_by_seed() -> None:
    regime = workload.REGIMES["light"]
    items = workload.build_workload(regime, seed=3)
    assert len(items) == regime.groups * regime.per_group == 240
    by_group: dict[str, set[str]] = {}
    for item in items:
        (body,) = item.bodies
        assert body["stream"] is True and body["max_tokens"] == 32
        by_group.setdefault(item.group, set()).add(body["messages"][0]["content"])
    assert len(by_group) == 48 and all(len(p) == 1 for p in by_group.values())
    assert [i.group for i in items] != sorted(i.group for i in items)  # shuffled
    again = workload.build_workload(regime, seed=3)
    assert [i.bodies for i in again] == [i.bodies for i in items]
    other = workload.build_workload(regime, seed=4)
    assert [i.group for i in other] != [i.group for i in items]
    assert len(workload.build_workload(regime, seed=3, quick=True)) == 60


def test_open_loop_burst_and_agentic_shapes() -> None:
    sat = workload.build_workload(workload.REGIMES["saturation"], seed=1)
    times = [i.at_s for i in sat]
    assert all(t is not None for t in times) and times == sorted(times)  # type: ignore[type-var]
    rate = len(times) / times[-1]  # type: ignore[operator]
    assert 0.8 * 110 < rate < 1.2 * 110
    burst = workload.build_workload(workload.REGIMES["hot_burst"], seed=1)
    hot = [i for i in burst if i.group == "hot"]
    assert len(hot) == 64 and {i.tags["burst_after"] for i in hot} == {"96"}
    agentic = workload.build_workload(workload.REGIMES["agentic"], seed=1)
    for item in agentic:
        assert all("tools" in b for b in item.bodies)
        assert item.bodies[0]["tool_choice"]["function"]["name"].startswith("search_docs")
        assert all(b["tool_choice"] == "auto" for b in item.bodies[1:])
        for before, after in zip(item.bodies, item.bodies[1:], strict=False):
            # each turn extends the previous turn's conversation
            assert after["messages"][: len(before["messages"])] == before["messages"]
            assert len(after["messages"]) == len(before["messages"]) + 2


def test_table_has_one_row_per_cell() -> None:
    cells = [
        {"regime": "light", "router": "kvrouter:kv_aware", "requests": 240, "hit_rate": 0.7512,
         "ttft_p50_s": 0.0123, "ttft_p99_s": 0.14, "errors": 0, "imbalance": 1.2,
         "preemptions": 0},
        {"regime": "light", "router": "vllm-router:kv_aware", "skipped": "not installed"},
    ]  # fmt: skip
    lines = workload.markdown_table(cells).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| light | kvrouter:kv_aware | 240 | 0.751 | 0.012 | 0.140 | 0 | 1.20 | 0 |"
    assert "skipped: not installed" in lines[3]
    assert workload.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert workload.percentile([], 99) is None
    assert workload.imbalance([10, 10, 20]) == pytest.approx(1.5)


def test_verdict_compares_kv_aware_with_the_best_peer() -> None:
    def cell(regime: str, router: str, hit: float, p99: float) -> dict[str, object]:
        return {"regime": regime, "router": router, "hit_rate": hit, "ttft_p99_s": p99,
                "errors": 0}

    cells = [
        cell("light", "kvrouter:kv_aware", 0.76, 0.10),
        cell("light", "kvrouter:round_robin", 0.90, 0.01),  # not a peer
        cell("light", "kvrouter@/tmp/base:kv_aware", 0.90, 0.01),  # an A/B checkout: neither
        cell("light", "kvrouterx2:kv_aware", 0.90, 0.01),  # replicas: nor
        cell("light", "sglang-router:cache_aware", 0.75, 0.12),
        cell("pressure", "kvrouter:kv_aware", 0.44, 0.30),
        cell("pressure", "sglang-router:cache_aware", 0.48, 0.20),
        cell("pressure", "vllm-router:cache_aware", 0.46, 0.15),
        cell("agentic", "kvrouter:kv_aware", 0.9037, 0.10),
        cell("agentic", "sglang-router:cache_aware", 0.9040, 0.12),
    ]
    lines = workload.verdict_table(cells).splitlines()
    assert lines[2].endswith("| meets the bar |")
    assert "0.480 (sglang-router:cache_aware)" in lines[3]
    assert "0.150 (vllm-router:cache_aware)" in lines[3]
    assert lines[3].endswith("| LOSES: hit -0.040, p99 2.00x |")
    assert lines[4].endswith("| LOSES: hit -0.0003 |")  # not "-0.000"


def test_the_verdict_labels_gaps_against_the_same_build_run_twice() -> None:
    def cell(regime: str, router: str, hit: float, p99: float) -> dict[str, object]:
        return {"regime": regime, "router": router, "hit_rate": hit, "ttft_p99_s": p99,
                "errors": 0}

    control = "kvrouter@/work/main:kv_aware"
    cells = [
        # the twin differs by 0.010 hit and 1.10x p99: a 0.004 and 1.05x loss is noise here
        cell("light", "kvrouter:kv_aware", 0.740, 0.105),
        cell("light", control, 0.750, 0.0955),
        cell("light", "sglang-router:cache_aware", 0.744, 0.100),
        # the twin agrees closely: the same losses are beyond its spread
        cell("pressure", "kvrouter:kv_aware", 0.440, 0.315),
        cell("pressure", control, 0.441, 0.314),
        cell("pressure", "sglang-router:cache_aware", 0.444, 0.300),
    ]
    lines = workload.verdict_table(cells, control=control).splitlines()
    # The control is the subject's own build: never a peer, so the bar is unchanged.
    assert "0.744 (sglang-router:cache_aware)" in lines[2]
    assert lines[2].endswith("| LOSES: hit -0.004 (within the same-build spread 0.0100), "
                             "p99 1.05x (within the same-build spread 1.099x) |")
    assert lines[3].endswith("| LOSES: hit -0.004 (beyond the same-build spread 0.0010), "
                             "p99 1.05x (beyond the same-build spread 1.003x) |")
    # Seed by seed the two identical routers can differ more than pooled: that is shown too.
    seeds = [dict(c, seed=1) for c in cells[3:5]] + [
        dict(cell("pressure", "kvrouter:kv_aware", 0.43, 0.30), seed=2),
        dict(cell("pressure", control, 0.45, 0.33), seed=2)]
    line = workload.verdict_table(cells, control=control, per_seed=seeds).splitlines()[3]
    assert line.endswith("| LOSES: hit -0.004 (beyond the same-build spread 0.0010; up to "
                         "0.0200 in one seed), p99 1.05x (beyond the same-build spread 1.003x; "
                         "up to 1.100x in one seed) |")
    # With the peers' cells per seed too, how often each of the two met that seed's best
    # peer: both met its hit rate in seed 2 only; its p99 the subject met in seed 2 and the
    # control in neither.
    peer_seeds = [dict(cell("pressure", "sglang-router:cache_aware", 0.444, 0.300), seed=1),
                  dict(cell("pressure", "sglang-router:cache_aware", 0.42, 0.32), seed=2)]
    line = workload.verdict_table(cells, control=control,
                                  per_seed=seeds + peer_seeds).splitlines()[3]
    assert "up to 0.0200 in one seed; no lower in 1 of 2 seeds, the control in 1)" in line
    assert "up to 1.100x in one seed; no higher in 1 of 2 seeds, the control in 0)" in line
    # Without the control the verdict reads as before.
    assert workload.verdict_table(cells).splitlines()[2].endswith(
        "| LOSES: hit -0.004, p99 1.05x |")


async def test_one_live_cell(tmp_path: Path) -> None:
    regime = dataclasses.replace(workload.REGIMES["light"], name="tiny", concurrency=1,
                                 groups=3, per_group=3, prefix_tokens=120, max_tokens=4)
    items = workload.build_workload(regime, seed=1)
    args = argparse.Namespace(pods=2, seed=1, pod_cpus=None, router_cpus=None, trace=True)
    cell = await quality.run_cell(regime, "kvrouter:round_robin", items, args, tmp_path)
    assert cell["requests"] == 9 and cell["errors"] == 0, cell["error_samples"]
    # one request at a time alternating over 2 pods: even load, and each group of 3 puts two
    # requests on one pod, the second of which hits the first's prefix
    assert cell["imbalance"] == pytest.approx(5 / 4.5)
    assert cell["hit_rate"] > 0.1
    assert 0 < cell["ttft_p50_s"] <= cell["ttft_p99_s"]
    assert sum(p["requests"] for p in cell["per_pod"]) == 9
    # --trace: every request's usage chunk was read, and the pods' per-request cached tokens
    # add up to their own hit counters.
    trace = cell["trace"]
    assert len(trace) == 9 and all(r["backend"] and r["prompt_tokens"] for r in trace)
    assert sum(r["cached_tokens"] for r in trace) == sum(p["hits"] for p in cell["per_pod"])
    # The pod that answered, from the emulator's completion id: the same one-to-one map as
    # the backend kvrouter reports, and round_robin at concurrency 1 alternates the two.
    assert {(r["backend"], r["pod"]) for r in trace} == {
        (trace[0]["backend"], trace[0]["pod"]), (trace[1]["backend"], trace[1]["pod"])}
    assert {r["pod"] for r in trace} == {"pod 0", "pod 1"}
    assert all(a["pod"] != b["pod"] for a, b in itertools.pairwise(trace))
    kinds = workload.miss_kinds(trace)
    assert kinds is not None and kinds["first"] == 3 and sum(kinds.values()) - kinds[
        "stale"] == 9


def test_misses_are_sorted_by_why_they_missed() -> None:
    def row(start: float, group: str, pod: str, cached: int, ttft: float = 0.05,
            predicted: int | None = None) -> dict[str, object]:
        return {"start_s": start, "group": group, "pod": pod, "ttft_s": ttft,
                "prompt_tokens": 100, "cached_tokens": cached, "predicted_hit_tokens": predicted}

    trace = [
        row(0.00, "a", "pod 0", 0, ttft=0.50),  # first of a
        row(0.10, "a", "pod 1", 0),  # a's first still computing on pod 0: moved while computing
        row(0.20, "b", "pod 2", 0),  # first of b
        row(0.70, "a", "pod 0", 90),  # a hit
        row(0.80, "b", "pod 3", 0),  # b done on pod 2, sent to pod 3: moved
        row(0.90, "b", "pod 2", 10, predicted=96),  # back on pod 2, which evicted it: evicted,
    ]  # and the router predicted a hit there (stale)
    assert workload.miss_kinds(trace) == {"hits": 1, "first": 2, "moved while computing": 1,
                                          "moved": 1, "evicted": 1, "stale": 1}
    # Given out of order, the same (rows are taken in the order sent).
    assert workload.miss_kinds(trace[::-1]) == workload.miss_kinds(trace)
    # kvrouter's reported backend stands in where no pod was recorded; a row with neither
    # makes the cell unknown.
    assert workload.miss_kinds([{**r, "pod": None, "backend": r["pod"]} for r in trace]) == (
        workload.miss_kinds(trace))
    assert workload.miss_kinds([*trace, {**trace[0], "pod": None}]) is None
    table = workload.misses_table([
        {"regime": "pressure", "router": "x", "seed": 1, "trace": trace},
        {"regime": "pressure", "router": "x", "seed": 2, "trace": trace},
        {"regime": "pressure", "router": "untraced", "seed": 1}])
    assert table.splitlines()[2] == "| pressure | x | 2 | 4 | 2 | 2 | 2 | 2 |"
    assert len(table.splitlines()) == 3


def test_the_pod_is_read_from_the_emulators_completion_id() -> None:
    assert quality._pod_of([b'data: {"id":"chatcmpl-3-17","object":"chat.completion.chunk"}']) == (
        "pod 3")
    assert quality._pod_of([b"data: {\"id\": \"cmpl-0-1\"}"]) == "pod 0"
    # A real vLLM's ids are random hex: no pod, rather than a wrong one.
    assert quality._pod_of([b'data: {"id":"chatcmpl-9f2c4e1a7b","choices":[]}']) is None


def test_seeds_pool_into_one_row_per_regime_and_router() -> None:
    def cell(seed: int, hits: float, ttfts: list[float]) -> dict[str, object]:
        pods = [{"hits": hits, "queries": 100.0, "requests": r, "preemptions": 0.0}
                for r in (3.0, 1.0)]
        return {"regime": "light", "router": "kvrouter:kv_aware", "seed": seed,
                "requests": 4, "errors": seed - 1, "preemptions": 0, "per_pod": pods,
                "ttft_s": ttfts}

    pooled = workload.pool_cells([
        cell(1, 50.0, [0.1, 0.2, 0.3, 0.4]),
        cell(2, 70.0, [0.5, 0.6, 0.7, 0.8]),
        {"regime": "light", "router": "vllm-router:kv_aware", "seed": 1, "skipped": "x"},
    ])
    mine, skipped = pooled
    assert mine["seeds"] == [1, 2] and mine["requests"] == 8 and mine["errors"] == 1
    assert mine["hit_rate"] == pytest.approx((2 * 50 + 2 * 70) / 400)
    assert mine["ttft_p50_s"] == 0.4 and mine["ttft_p99_s"] == 0.8
    assert mine["imbalance"] == pytest.approx(6 / 4)
    assert skipped == {"regime": "light", "router": "vllm-router:kv_aware", "skipped": "x"}


def test_a_kvrouter_variant_sets_policy_params_and_runs_another_checkout(tmp_path: Path) -> None:
    import yaml
    from quality_procs import ROOT, Router

    class Pods:
        urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]

    variant = Router("kvrouter:kv_aware+copy_cutoff_t=0+work_floor_ratio=0.5",
                     tmp_path / "a.log", seed=3)
    variant._command(Pods(), 9)  # type: ignore[arg-type]
    config = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert config["policy"] == {"name": "kv_aware", "seed": 3,
                                "params": {"copy_cutoff_t": 0, "work_floor_ratio": 0.5}}
    assert variant.tree() == ROOT

    base = Router("kvrouter@/tmp/base:kv_aware", tmp_path / "b.log", seed=3)
    base._command(Pods(), 9)  # type: ignore[arg-type]
    assert base.tree() == Path("/tmp/base")
    assert yaml.safe_load((tmp_path / "b.yaml").read_text())["policy"] == {
        "name": "kv_aware", "seed": 3}


def test_added_ttft_pairs_each_groups_cold_prompt_with_a_warm_one() -> None:
    import added_ttft

    pairs = added_ttft.pairs(seed=1, groups=5)
    assert len(pairs) == 5 and len({g for g, _, _ in pairs}) == 5
    for _, cold, warm in pairs:
        assert cold["messages"][0] == warm["messages"][0]  # the group's shared system prompt
        assert cold["messages"][1:] != warm["messages"][1:]


def test_added_ttft_splits_an_strace_into_route_pod_and_relay() -> None:
    import added_ttft

    def request(t: float, route: float, pod: float, relay: float) -> list[str]:
        # the client's socket is fd 9, the pod's fd 12; a KV-event read on fd 20 in between;
        # strace pads a short thread id with spaces
        return [
            f'7  {t:.6f} read(9, "POST /v1/chat/completions HTTP/1.1\\r\\n"..., 65536) = 7700',
            f'8 {t + route / 2:.6f} read(20, "kv@pod-0"..., 64) = 8',
            f'7 {t + route:.6f} write(12, "POST /v1/chat/completions HTTP/1.1\\r\\n"..., 7750) = 7750',
            f'7 {t + route + pod / 2:.6f} read(12, "HTTP/1.1 200 OK\\r\\n"..., 65536) = 120',
            f'7 {t + route + pod:.6f} read(12, "5a\\r\\ndata: {{\\"id\\""..., 65536) = 96',
            f'7 {t + route + pod + relay:.6f} write(9, "5a\\r\\ndata: {{\\"id\\""..., 96) = 96',
        ]

    text = "\n".join(request(100.0, 0.002, 0.050, 0.0002) + request(101.0, 0.001, 0.008, 0.0001)
                     + request(102.0, 0.004, 0.060, 0.0002) + request(103.0, 0.001, 0.006, 0.0001))
    out = added_ttft.split_trace(text)
    assert out["cold_route_ms"] == pytest.approx(3.0, abs=1e-3)  # median of 2 and 4
    assert out["cold_pod_ms"] == pytest.approx(55.0, abs=1e-3)
    assert out["warm_route_ms"] == pytest.approx(1.0, abs=1e-3)
    assert out["warm_relay_ms"] == pytest.approx(0.1, abs=1e-3)
