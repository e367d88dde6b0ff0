"""Policy parity: the same recorded inputs through the live router's pool/proxy bookkeeping and
through the simulator's adapter give the same decisions.

A short simulation of each policy is recorded at the adapter boundary (requests with their
times, first tokens, scrapes, KV events, finishes). The recording is then replayed, with a fresh policy built
from the same name and seed, through (a) a fresh ``SimRouter`` and (b) ``router.pool.BackendPool``
plus a ``PrefixIndex``, called exactly as ``router.proxy`` calls them. Every decision (backend,
predicted hits, scores) and every candidate snapshot must be equal in all three.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from policies.bookkeeping import decide
from policies.kv.index import PrefixIndex
from policies.registry import build_policy
from policies.types import BackendState, ClusterView, Decision, RouteRequest
from router.pool import BackendPool
from simulator.cluster import ClusterSim, SimConfig
from simulator.routing import EngineSignals, SimRouter
from simulator.workloads import parse_synthetic, synthetic

Op = tuple[Any, ...]


def _record(
    policy: str, seed: int
) -> tuple[list[Op], list[Decision], list[tuple[BackendState, ...]]]:
    config = SimConfig(backends=4, num_gpu_blocks=1500, seed=seed, scrape_interval_s=0.5)
    sim = ClusterSim(config, policy)
    router = sim.router
    ops: list[Op] = []
    decisions: list[Decision] = []
    views: list[tuple[BackendState, ...]] = []
    route, first_token, finish, scrape, apply_event = (
        router.route,
        router.first_token,
        router.finish,
        router.scrape,
        router.apply_event,
    )

    def rec_route(request: RouteRequest, now_s: float) -> Decision:
        views.append(router.snapshot(now_s))
        decision = route(request, now_s)
        ops.append(("route", request, now_s))
        decisions.append(decision)
        return decision

    def rec_first_token(request: RouteRequest, decision: Decision, now_s: float) -> None:
        ops.append(("first_token", request.request_id, now_s))
        first_token(request, decision, now_s)

    def rec_finish(request: RouteRequest, decision: Decision, now_s: float, ok: bool) -> None:
        ops.append(("finish", request.request_id, now_s, ok))
        finish(request, decision, now_s, ok)

    def rec_scrape(position: int, signals: EngineSignals, now_s: float) -> None:
        ops.append(("scrape", position, signals, now_s))
        scrape(position, signals, now_s)

    def rec_event(position: int, event: Any, now_s: float) -> None:
        ops.append(("event", position, event, now_s))
        apply_event(position, event, now_s)

    (router.route, router.first_token, router.finish, router.scrape,  # type: ignore[method-assign]
     router.apply_event) = (
        rec_route,
        rec_first_token,
        rec_finish,
        rec_scrape,
        rec_event,
    )
    name, params = parse_synthetic("synthetic:multi_tenant,requests=120,rate=6,tenants=12")
    sim.run(synthetic(name, params, seed))
    return ops, decisions, views


def _replay_sim(
    policy: str, seed: int, ops: list[Op]
) -> tuple[list[Decision], list[tuple[BackendState, ...]]]:
    router = SimRouter(build_policy(policy, {}, random.Random(seed)), 4)
    decisions, views, requests = [], [], {}
    for op in ops:
        if op[0] == "route":
            _, request, now_s = op
            views.append(router.snapshot(now_s))
            decision = router.route(request, now_s)
            decisions.append(decision)
            requests[request.request_id] = (request, decision)
        elif op[0] == "first_token":
            request, decision = requests[op[1]]
            router.first_token(request, decision, op[2])
        elif op[0] == "finish":
            request, decision = requests.pop(op[1])
            router.finish(request, decision, op[2], op[3])
        elif op[0] == "scrape":
            router.scrape(op[1], op[2], op[3])
        else:
            router.apply_event(op[1], op[2], op[3])
    return decisions, views


def _replay_live(
    policy: str, seed: int, ops: list[Op]
) -> tuple[list[Decision], list[tuple[BackendState, ...]]]:
    """The live router's calls, in ``router.proxy._dispatch``/``_attempt`` order."""
    pool = BackendPool()
    ids = [pool.add(f"engine-{i}").backend_id for i in range(4)]
    for backend_id in ids:
        backend = pool.get(backend_id)
        assert backend is not None
        backend.kv_events = True  # what the KV event ingestion loop sets
    index = PrefixIndex(max_entries=2_000_000)
    chosen = build_policy(policy, {}, random.Random(seed))
    decisions, views, requests = [], [], {}
    for op in ops:
        if op[0] == "route":
            _, request, now_s = op
            candidates = pool.snapshot(request.model, now_s)
            views.append(candidates)
            decision = decide(chosen, request, ClusterView(now_s, candidates, index))
            backend = pool.acquire(decision.backend_id, request.prompt_tokens, now_s)
            chosen.on_dispatched(request, decision, now_s)
            decisions.append(decision)
            requests[request.request_id] = (request, decision, backend)
        elif op[0] == "first_token":  # router.proxy._relay_stream's first chunk
            request, decision, _ = requests[op[1]]
            chosen.on_first_token(request, decision, op[2])
        elif op[0] == "finish":
            request, decision, backend = requests.pop(op[1])
            pool.release(backend, request.prompt_tokens)
            chosen.on_finished(request, decision, op[2], op[3])
        elif op[0] == "scrape":
            _, position, signals, now_s = op
            backend = pool.get(ids[position])
            assert backend is not None
            backend.scraped(signals, now_s)  # what the engine-metrics scrape loop does
        else:
            index.apply(ids[op[1]], op[2], op[3])
    return decisions, views


@pytest.mark.parametrize(
    "policy", ["kv_aware", "session_affinity", "sglang_cache_aware", "least_loaded"]
)
def test_same_inputs_same_decisions_in_router_and_simulator(policy: str) -> None:
    ops, recorded, recorded_views = _record(policy, seed=11)
    assert sum(1 for op in ops if op[0] == "route") == 120
    assert any(op[0] == "event" for op in ops) and any(op[0] == "scrape" for op in ops)
    assert sum(1 for op in ops if op[0] == "first_token") == 120
    sim_decisions, sim_views = _replay_sim(policy, 11, ops)
    live_decisions, live_views = _replay_live(policy, 11, ops)
    assert sim_views == recorded_views
    assert live_views == recorded_views
    assert sim_decisions == recorded
    assert live_decisions == recorded
    # Not a vacuous comparison: the policy used more than one backend.
    assert len({d.backend_id for d in recorded}) > 1
