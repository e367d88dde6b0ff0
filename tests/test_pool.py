"""The backend pool's snapshots and the breaker's state machine (time passed in, no sleeps)."""

from __future__ import annotations

import pytest

from policies.bookkeeping import EngineSignals
from policies.types import Role
from router.breaker import Breaker, BreakerState
from router.pool import BackendPool

BREAKER_CASES = [
    ("stays-closed-below-threshold", ["fail@0", "fail@1", "ok", "fail@2", "fail@3"],
     BreakerState.CLOSED),
    ("opens-at-threshold", ["fail@0", "fail@1", "fail@2"], BreakerState.OPEN),
    ("half-open-after-open-s", ["fail@0", "fail@0", "fail@0", "dispatch@10"],
     BreakerState.HALF_OPEN),
    ("probe-success-closes", ["fail@0", "fail@0", "fail@0", "dispatch@10", "ok"],
     BreakerState.CLOSED),
    ("probe-failure-reopens", ["fail@0", "fail@0", "fail@0", "dispatch@10", "fail@10"],
     BreakerState.OPEN),
    ("dispatch-while-open-is-not-a-probe", ["fail@0", "fail@0", "fail@0", "dispatch@5"],
     BreakerState.OPEN),
    ("healthy-check-after-ejection-half-opens", ["fail@1", "fail@1", "fail@1", "healthy@2"],
     BreakerState.HALF_OPEN),
    ("healthy-check-begun-before-ejection-does-not", ["fail@1", "fail@1", "fail@1",
                                                      "healthy@0.5"], BreakerState.OPEN),
    ("healthy-check-while-closed-changes-nothing", ["fail@1", "healthy@2"],
     BreakerState.CLOSED),
    ("half-opened-by-health-probe-fails-reopens", ["fail@1", "fail@1", "fail@1", "healthy@2",
                                                   "dispatch@3", "fail@3"], BreakerState.OPEN),
]


@pytest.mark.parametrize("steps,state", [c[1:] for c in BREAKER_CASES],
                         ids=[c[0] for c in BREAKER_CASES])
def test_breaker_transitions(steps, state):
    breaker = Breaker(failure_threshold=3, open_s=10.0)
    for step in steps:
        what, _, at = step.partition("@")
        if what == "fail":
            breaker.on_failure(float(at))
        elif what == "ok":
            breaker.on_success()
        elif what == "healthy":
            breaker.on_healthy_probe(float(at))
        else:
            breaker.on_dispatch(float(at))
    assert breaker.state is state


def test_half_open_lets_one_probe_at_a_time():
    breaker = Breaker(failure_threshold=1, open_s=5.0)
    breaker.on_failure(0.0)
    assert not breaker.allows(4.9)
    assert breaker.allows(5.0)
    breaker.on_dispatch(5.0)
    assert not breaker.allows(5.1)  # the probe is in flight
    breaker.on_abandoned()  # the client left: no verdict, the slot frees
    assert breaker.allows(5.2)


def test_snapshot_filters_and_orders():
    pool = BackendPool(failure_threshold=1, open_s=30.0, engine_signals_max_age_s=10.0)
    a = pool.add("http://a:1/", models=["m"])
    pool.add("http://b:1", models=["other"])
    c = pool.add("http://c:1")  # models unknown: serves anything
    d = pool.add("http://d:1", role=Role.PREFILL)
    e = pool.add("http://e:1")
    e.healthy = False
    d.breaker.on_failure(100.0)
    assert [s.backend_id for s in pool.snapshot("m", 100.0)] == ["http://a:1", "http://c:1"]
    assert [s.backend_id for s in pool.snapshot("m", 131.0)] == [
        "http://a:1", "http://c:1", "http://d:1"]
    assert [s.backend_id for s in pool.snapshot("m", 131.0, exclude=["http://a:1"],
                                                roles=frozenset({Role.MIXED}))] == ["http://c:1"]
    assert pool.knows_model("m") and pool.knows_model("anything")  # c serves anything
    assert pool.add("http://a:1") is a  # adding again returns the same backend
    assert c.serves("x")


def test_snapshot_carries_load_and_hides_stale_engine_signals():
    pool = BackendPool(engine_signals_max_age_s=10.0)
    a = pool.add("http://a:1")
    pool.acquire(a.backend_id, 120, 0.0)
    a.scraped(EngineSignals(waiting_requests=4, kv_usage_ratio=0.5), 100.0)
    (fresh,) = pool.snapshot("", 105.0)
    assert (fresh.in_flight_requests, fresh.in_flight_prompt_tokens) == (1, 120)
    assert (fresh.engine_waiting_requests, fresh.kv_usage_ratio) == (4, 0.5)
    (stale,) = pool.snapshot("", 111.0)
    assert stale.engine_waiting_requests is None and stale.kv_usage_ratio is None
    pool.release(a, 120)
    assert pool.snapshot("", 0.0)[0].in_flight_requests == 0


def test_remove_notifies_and_model_union():
    pool = BackendPool()
    removed = []
    pool.on_removed.append(removed.append)
    a = pool.add("http://a:1")
    a.discovered_models = {"m": {"id": "m", "object": "model", "owned_by": "vllm"}}
    pool.add("http://b:1", models=["n"])
    assert sorted(pool.healthy_models()) == ["m", "n"]
    assert not pool.knows_model("z")
    pool.remove("http://a:1")
    pool.remove("http://a:1")
    assert removed == ["http://a:1"] and len(pool) == 1
