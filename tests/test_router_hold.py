"""Late binding: requests the policy defers wait in the router, in order, and go when room frees."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import CollectorRegistry

from policies.base import PolicyBase
from policies.types import ClusterView, Decision, RouteRequest
from router.hold import RouterHold


class OneAtATime(PolicyBase):
    """Defers while anything is in flight anywhere; records the order it dispatches in."""

    name = "one_at_a_time"

    def __init__(self) -> None:
        self.order: list[str] = []

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        return Decision(backend_id=view.backends[0].backend_id, reason="first")

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        return any(b.in_flight_requests for b in view.backends)

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.order.append(request.request_id)


async def test_deferred_requests_wait_in_the_router_and_leave_in_arrival_order(
        start_backend, start_router, http):
    backend = await start_backend(delay_s=0.2)
    policy = OneAtATime()
    router = await start_router({"backends": [backend.url]}, policy=policy,
                                rng=random.Random(0))

    async def send(i: int) -> float:
        started = asyncio.get_running_loop().time()
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": f"p{i}"},
                             headers={"x-request-id": f"r{i}"}) as response:
            assert response.status == 200
            await response.read()
        return asyncio.get_running_loop().time() - started

    first = asyncio.create_task(send(0))
    await asyncio.sleep(0.05)  # r0 is in flight at the backend
    rest = []
    for i in range(1, 4):
        rest.append(asyncio.create_task(send(i)))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    assert len(router.state.proxy.hold) == 3  # held in the router, not sent to the engine
    assert len(backend.received) == 1
    times = await asyncio.gather(first, *rest)
    assert policy.order == ["r0", "r1", "r2", "r3"]  # first in, first out
    # One at a time: each waited for the ones before it.
    assert times[3] >= 0.6  # r0's remaining ~0.15 s, then 3 x 0.2 s
    text = (await (await http.get(router.url + "/metrics")).read()).decode()
    assert "kvrouter_held_requests 0.0" in text
    assert "kvrouter_hold_seconds_count 3.0" in text


async def test_a_hold_never_outlasts_max_hold_s() -> None:
    hold = RouterHold(max_hold_s=0.1, registry=CollectorRegistry())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hold.wait(lambda: True)  # a policy that would defer forever
    assert 0.1 <= loop.time() - started < 1.0
    assert hold.expired._value.get() == 1  # type: ignore[attr-defined]
    assert not hold


async def test_a_held_client_that_leaves_frees_its_place() -> None:
    hold = RouterHold(max_hold_s=10.0, registry=CollectorRegistry())
    room = False
    first = asyncio.create_task(hold.wait(lambda: not room))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(hold.wait(lambda: not room))
    await asyncio.sleep(0.01)
    assert len(hold) == 2
    first.cancel()  # the client went away while at the head
    await asyncio.sleep(0.01)
    assert len(hold) == 1
    room = True
    hold.release()
    await asyncio.wait_for(second, 1.0)
    assert not hold


async def test_kv_aware_never_holds_a_request_that_no_finish_would_release(
        start_backend, start_router, http):
    # One client, one request at a time, backends far faster than kv_aware's H200 prediction:
    # the policy's predicted queues pile up, but nothing is in flight when the next request
    # comes, so no finish would ever re-ask the hold. It must not hold (it used to, for
    # policy.max_hold_s per request).
    backends = [await start_backend() for _ in range(2)]
    router = await start_router({"backends": [b.url for b in backends],
                                 "policy": {"name": "kv_aware", "max_hold_s": 5.0}})
    for i in range(30):
        prompt = f"{i} " + "The quick brown fox jumps over the lazy dog. " * 400
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": prompt}) as response:
            assert response.status == 200
            await response.read()
    registry = router.state.metrics.registry
    assert registry.get_sample_value("kvrouter_hold_seconds_count") == 0  # none was held
    assert registry.get_sample_value("kvrouter_hold_expired_total") == 0
