"""The first-token signal (``Policy.on_first_token``), end to end over real sockets.

The proxy reports a streamed request's first body chunk, which vLLM sends only with its first
token (its chat role chunk included), and the emulator must keep that timing, or the router
would learn from headers what it should learn from tokens."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from policies.base import PolicyBase
from policies.types import ClusterView, Decision, RouteRequest
from simulator.emulator.fleet import EmulatedCluster

MODEL = "tiny-llama"


class Recorder(PolicyBase):
    """Routes to the first backend; records each hook's (name, request id, time)."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        return Decision(backend_id=view.backends[0].backend_id, reason="first")

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.calls.append(("dispatched", request.request_id, now_s))

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.calls.append(("first_token", request.request_id, now_s))

    def on_finished(self, request: RouteRequest, decision: Decision, now_s: float,
                    ok: bool) -> None:
        self.calls.append(("finished", request.request_id, now_s))


async def test_the_proxy_reports_the_first_chunk_not_the_headers(
        start_backend, start_router, http) -> None:
    # Headers at once, then each of 3 chunks after 0.3 s: the first token is 0.3 s in.
    backend = await start_backend(chunk_delay_s=0.3, chunks=3)
    policy = Recorder()
    router = await start_router({"backends": [backend.url]}, policy=policy,
                                rng=random.Random(0))
    body = {"model": "tiny", "prompt": "p", "stream": True}
    async with http.post(router.url + "/v1/completions", json=body,
                         headers={"x-request-id": "s1"}) as response:
        assert response.status == 200
        await response.read()
    async with http.post(router.url + "/v1/completions", json={**body, "stream": False},
                         headers={"x-request-id": "w1"}) as response:
        assert response.status == 200
        await response.read()
    streamed = [(name, t) for name, rid, t in policy.calls if rid == "s1"]
    assert [name for name, _ in streamed] == ["dispatched", "first_token", "finished"]
    dispatched_s, first_s, finished_s = (t for _, t in streamed)
    assert first_s - dispatched_s >= 0.25  # the first chunk, not the headers
    assert finished_s - first_s >= 0.5  # two more chunks after it
    # A whole answer's first byte is its end: no first-token report.
    assert [name for name, rid, _ in policy.calls if rid == "w1"] == ["dispatched", "finished"]


@pytest.fixture
async def slow_pod() -> AsyncIterator[EmulatedCluster]:
    # 1/50 of real time: a ~1,000-token prefill of the H200 model takes about 1.5 s of wall.
    async with EmulatedCluster(count=1, time_scale=0.02, block_size=16) as cluster:
        yield cluster


@pytest.mark.parametrize("n", [1, 2], ids=["fast-path", "n=2"])
async def test_the_emulators_chat_stream_starts_with_the_first_token(
        slow_pod: EmulatedCluster, n: int) -> None:
    body = {
        "model": MODEL, "stream": True, "max_tokens": 2, "n": n,
        "messages": [{"role": "user", "content": "tell me about the cache " * 200}],
    }
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(slow_pod.urls[0] + "/v1/chat/completions",
                                json=body) as response:
            assert response.status == 200
            headers_s = time.monotonic() - started
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 30)
            first_s = time.monotonic() - started
            rest = await response.content.read()
    # vLLM's role chunk comes with the first engine output, after the prefill.
    assert b'"role":"assistant"' in first
    assert first_s - headers_s >= 0.5
    assert rest.endswith(b"data: [DONE]\n\n")
    assert rest.count(b'"role":"assistant"') == n - 1


class OnePrefillAtATime(Recorder):
    """Defers while a dispatched streamed request has not had its first token."""

    def __init__(self) -> None:
        super().__init__()
        self.prefilling: set[str] = set()

    def defer(self, request: RouteRequest, view: ClusterView) -> bool:
        return bool(self.prefilling)

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        super().on_dispatched(request, decision, now_s)
        self.prefilling.add(request.request_id)

    def on_first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        super().on_first_token(request, decision, now_s)
        self.prefilling.discard(request.request_id)


async def test_a_first_token_lets_a_held_request_ask_again(
        start_backend, start_router, http) -> None:
    # First token 0.3 s in, the end 0.9 s in: the held request must go at the first token.
    backend = await start_backend(chunk_delay_s=0.3, chunks=3)
    policy = OnePrefillAtATime()
    router = await start_router({"backends": [backend.url]}, policy=policy,
                                rng=random.Random(0))

    async def send(rid: str) -> None:
        async with http.post(router.url + "/v1/completions",
                             json={"model": "tiny", "prompt": rid, "stream": True},
                             headers={"x-request-id": rid}) as response:
            assert response.status == 200
            await response.read()

    first = asyncio.create_task(send("r0"))
    await asyncio.sleep(0.1)
    await asyncio.gather(first, send("r1"))
    at = {(name, rid): t for name, rid, t in policy.calls}
    assert at[("first_token", "r0")] <= at[("dispatched", "r1")]
    assert at[("dispatched", "r1")] < at[("finished", "r0")] - 0.3


@pytest.mark.parametrize("learn", [True, False], ids=["learned", "off"])
async def test_kv_aware_learns_a_slow_backend_from_its_first_tokens(
        start_backend, start_router, http, learn: bool) -> None:
    """Two backends, one whose first token comes ~20x later: once each answered a streamed
    request, kv_aware prices the slow one at its speed and sends new prompts to the other
    (with learning off, the seeded draws split them)."""
    slow = await start_backend(name="slow", chunks=1, chunk_delay_s=0.4)
    fast = await start_backend(name="fast", chunks=1, chunk_delay_s=0.02)
    params = {"speed_min_ttft_s": 0.0} | ({} if learn else {"speed_max_ratio": 1.0})
    router = await start_router({"backends": [slow.url, fast.url],
                                 "policy": {"name": "kv_aware", "params": params}},
                                rng=random.Random(0))

    async def send(i: int) -> str:
        body = {"model": "tiny", "prompt": f"{i} " + "words of a long prompt " * 150,
                "stream": True, "max_tokens": 1}
        async with http.post(router.url + "/v1/completions", json=body) as response:
            assert response.status == 200
            await response.read()
            return response.headers["X-Engine"]

    # Sent together, the second sees the first in flight and goes to the other backend.
    assert sorted(await asyncio.gather(send(0), send(1))) == ["fast", "slow"]
    engines = [await send(i) for i in range(2, 12)]
    async with http.get(router.url + "/metrics") as response:
        exposition = await response.text()
    factors = {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
               for line in exposition.splitlines()
               if line.startswith("kvrouter_backend_speed_factor{")}
    if learn:
        assert engines == ["fast"] * 10
        assert factors[slow.url] > 2.0 and factors[fast.url] == 1.0
    else:  # ties drawn at random: all ten to the fast one would be 1 in 1,024
        assert "slow" in engines
        assert factors == {slow.url: 1.0, fast.url: 1.0}
