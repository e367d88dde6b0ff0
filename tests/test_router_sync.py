"""Replica sync in the live router: two router apps on real sockets (HTTP, and ZeroMQ PUB/SUB
on 127.0.0.1 or Unix sockets as `serve --workers` uses) in front of real HTTP backends. Replica B's decisions see the requests replica A
has in flight; a replica that goes away has its share expire; only peers may subscribe; the
``sync:`` section's errors name the key."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from fake_backend import FakeBackend, RouterHandle, wait_for
from ports import free_port

from router.config import ConfigError, parse_config

MODEL = "tiny"


def raw_config(backends: list[FakeBackend], own: int, peer: int, transport: str = "tcp",
               **sync: Any) -> dict[str, Any]:
    """A replica's config. ``unix``: Unix sockets named by the ports (serve --workers's
    transport) instead of ZeroMQ over TCP."""
    if transport == "unix":
        endpoints = {"bind": f"unix://{tempfile.gettempdir()}/kvr-sync-{own}.sock",
                     "peers": [f"unix://{tempfile.gettempdir()}/kvr-sync-{peer}.sock"]}
    else:
        endpoints = {"bind": f"tcp://127.0.0.1:{own}", "peers": [f"tcp://127.0.0.1:{peer}"],
                     "allow_from": ["127.0.0.1"]}
    return {
        "backends": [b.url for b in backends],
        "policy": {"name": "least_loaded", "seed": own},
        "health": {"interval_s": 60},
        "sync": {"enabled": True, **endpoints, "discover_interval_s": 0.1,
                 "heartbeat_interval_s": 0.1, "peer_timeout_s": 0.5, **sync},
    }




def peers_of(handle: RouterHandle) -> int:
    value = handle.state.metrics.registry.get_sample_value("kvrouter_sync_peers")
    return int(value or 0)


def peer_in_flight(handle: RouterHandle) -> int:
    sync = handle.state.policy.sync  # type: ignore[attr-defined]
    return int(sync.peer_in_flight())


@contextlib.asynccontextmanager
async def subscriber(port: int) -> AsyncIterator[zmq.asyncio.Socket]:
    """A ZeroMQ SUB socket subscribed to everything a replica's PUB socket on ``port`` sends."""
    context = zmq.asyncio.Context()
    sub = context.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        yield sub
    finally:
        sub.close(0)
        context.term()


async def complete(http: aiohttp.ClientSession, handle: RouterHandle) -> int:
    async with http.post(f"{handle.url}/v1/completions",
                         json={"model": MODEL, "prompt": "x", "max_tokens": 1}) as resp:
        await resp.read()
        return resp.status


async def published_sends(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
    http: aiohttp.ClientSession,
    **sync: Any,
) -> list[list[list[str]]]:
    """Four requests within a few ms through a replica with no peers, and what it published:
    per ZeroMQ send, per frame, the message kinds. Heartbeats come every 5 s, so none falls
    within the test. Frames of one message and batch frames both decode."""
    from router.sync.wire import decode_frame

    backend = await start_backend()
    port = free_port()
    raw = raw_config([backend], port, 1, heartbeat_interval_s=5.0, peer_timeout_s=10.0, **sync)
    raw["sync"]["peers"] = []
    handle = await start_router(raw)
    sends: list[list[list[str]]] = []
    async with subscriber(port) as sub:
        await asyncio.sleep(0.3)  # the subscription reaches the PUB socket
        assert await asyncio.gather(*(complete(http, handle) for _ in range(4))) == [200] * 4
        while await sub.poll(400):
            sends.append([[type(m).__name__
                            for m in decode_frame(f, monotonic_now_s=0, unix_now_s=0)]
                           for f in await sub.recv_multipart()])
    return sends


async def debug_route(http: aiohttp.ClientSession, handle: RouterHandle) -> str:
    async with http.post(f"{handle.url}/debug/route",
                         json={"model": MODEL, "prompt": "hello", "max_tokens": 1}) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["decision"]["backend_id"])


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_replica_b_routes_around_replica_as_in_flight_load(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
    http: aiohttp.ClientSession,
    transport: str,
) -> None:
    slow = [await start_backend(delay_s=30.0) for _ in range(2)]
    port_a, port_b = free_port(), free_port()
    a = await start_router(raw_config(slow, port_a, port_b, transport))
    b = await start_router(raw_config(slow, port_b, port_a, transport))
    await wait_for(lambda: peers_of(a) == 1 and peers_of(b) == 1, "both replicas hear each other")

    # One request held open through A: it lands on one backend and stays in flight there.
    held = asyncio.create_task(complete(http, a))
    await wait_for(lambda: sum(len(s.received) for s in slow) == 1, "A's request at a backend")
    loaded = next(s.url for s in slow if s.received)
    idle = next(s.url for s in slow if not s.received)
    await wait_for(lambda: peer_in_flight(b) == 1, "B hears of A's dispatch")
    # B's own counters show nothing in flight; its policy sees A's request all the same. A
    # replica blind to A would pick each backend half the time (ties are broken at random).
    assert all(x.in_flight_requests == 0 for x in b.state.pool)
    chosen = [await debug_route(http, b) for _ in range(8)]
    assert chosen == [idle] * 8, (loaded, chosen)

    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    await wait_for(lambda: peer_in_flight(b) == 0, "A's finish reaches B")
    metrics = b.state.metrics.registry
    assert (metrics.get_sample_value("kvrouter_sync_messages_total", {"direction": "received"})
            or 0) >= 2


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_a_replica_that_goes_away_has_its_share_expire(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
    http: aiohttp.ClientSession,
    transport: str,
) -> None:
    slow = [await start_backend(delay_s=30.0)]
    port_a, port_b = free_port(), free_port()
    a = await start_router(raw_config(slow, port_a, port_b, transport))
    b = await start_router(raw_config(slow, port_b, port_a, transport))
    await wait_for(lambda: peers_of(b) == 1, "B hears A")
    held = asyncio.create_task(complete(http, a))
    await wait_for(lambda: peer_in_flight(b) == 1, "B hears of A's dispatch")
    await a.app.stop()  # A's sockets close mid-request: no Finish, no more heartbeats
    await wait_for(lambda: peer_in_flight(b) == 0 and peers_of(b) == 0, "A's share expires",
                   timeout_s=5.0)
    assert b.state.metrics.registry.get_sample_value("kvrouter_sync_peers_expired_total") == 1
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


async def test_a_unix_peer_that_starts_later_is_reached_soon(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
) -> None:
    # serve --workers starts its workers together: each finds the others' sockets missing
    # at first. B must not wait out its discovery interval (30 s here) to hear A.
    backend = await start_backend()
    port_a, port_b = free_port(), free_port()
    b = await start_router(raw_config([backend], port_b, port_a, "unix",
                                      discover_interval_s=30.0))
    await asyncio.sleep(0.2)  # B has looked for A and not found it
    assert peers_of(b) == 0
    a = await start_router(raw_config([backend], port_a, port_b, "unix",
                                      discover_interval_s=30.0))
    await wait_for(lambda: peers_of(b) == 1, "B hears A", timeout_s=2.0)
    assert a.state.metrics.registry.get_sample_value("kvrouter_sync_subscribed_endpoints") == 1


async def test_only_peers_may_subscribe(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
) -> None:
    backend = await start_backend()
    port = free_port()
    # Its only peer is at 127.0.0.2 (nothing listens there); 127.0.0.1 is not allowed.
    raw = raw_config([backend], port, 1, allow_from=[])
    raw["sync"]["peers"] = ["tcp://127.0.0.2:9"]
    handle = await start_router(raw)
    async with subscriber(port) as sub:
        registry = handle.state.metrics.registry
        await wait_for(lambda: (registry.get_sample_value(
            "kvrouter_sync_connections_refused_total") or 0) >= 1, "the stranger refused")
        assert await sub.poll(300) == 0  # and its heartbeats never reach it


@pytest.mark.parametrize("flush_interval_s", [0.3, 0.0])
async def test_messages_queued_within_the_flush_window_leave_as_one(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
    http: aiohttp.ClientSession,
    flush_interval_s: float,
) -> None:
    sends = await published_sends(start_backend, start_router, http,
                                  flush_interval_s=flush_interval_s)
    # Four requests within a few ms: four dispatches (least_loaded shares each), and a state
    # ending every window in which the replica's own work changed.
    lifecycle = [[k for frame in send for k in frame] for send in sends]
    assert sum(batch.count("Dispatch") for batch in lifecycle) == 4, sends
    assert all(batch[-1] == "State" for batch in lifecycle), sends
    if flush_interval_s:
        # 0.3 s covers the four requests' whole lives: one send, one wake-up per peer, and
        # one state for the lot.
        assert lifecycle == [["Dispatch"] * 4 + ["State"]], sends
    else:
        # Every loop turn sends what it queued: the finishes' state leaves after the dispatches.
        assert len(lifecycle) > 1, sends


@pytest.mark.parametrize(("policy", "send", "shipped"), [
    ("least_loaded", None, False),  # reads no prompt text: none on the wire
    ("sglang_cache_aware", None, True),  # matches characters: its peers need the text
    ("least_loaded", True, True),
    ("sglang_cache_aware", False, False),
], ids=["auto-off", "auto-on", "forced-on", "forced-off"])
async def test_prompt_text_is_shipped_only_to_policies_that_read_it(
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
    http: aiohttp.ClientSession,
    policy: str, send: bool | None, shipped: bool,
) -> None:
    from router.sync.wire import decode

    backend = await start_backend()
    port = free_port()
    raw = raw_config([backend], port, 1, heartbeat_interval_s=0.5, peer_timeout_s=2.0,
                     **({} if send is None else {"send_prompt_text": send}))
    raw["sync"]["peers"] = []
    raw["policy"]["name"] = policy
    handle = await start_router(raw)
    async with subscriber(port) as sub:
        await asyncio.sleep(0.3)  # the subscription reaches the PUB socket
        assert await complete(http, handle) == 200
        dispatches = []
        while await sub.poll(400):
            for frame in await sub.recv_multipart():
                message = decode(frame, monotonic_now_s=0, unix_now_s=0)
                if type(message).__name__ == "Dispatch":
                    dispatches.append(message)
    (dispatch,) = dispatches
    assert dispatch.request.prompt_tokens > 0
    assert dispatch.request.prompt_text == ("x" if shipped else "")


@pytest.mark.parametrize("sync, path", [
    ({"port": 0}, "sync.port"),
    ({"peers": ["10.0.0.1:5601"]}, "sync.peers[0]"),
    ({"bind": "udp://x"}, "sync.bind"),
    ({"bind": "tcp://*:5601", "peers": ["unix:///run/a.sock"]}, "sync.peers[0]"),
    ({"bind": "unix:///run/b.sock", "peers": ["tcp://10.0.0.1:5601"]}, "sync.peers[0]"),
    ({"bind": "unix:///run/b.sock", "dns_name": "kvrouter-peers"}, "sync.bind"),
    ({"heartbeat_interval_s": 2, "peer_timeout_s": 1}, "sync.peer_timeout_s"),
    ({"flush_interval_s": 1.0}, "sync.flush_interval_s"),
    ({"enabled": "yes"}, "sync.enabled"),
    ({"colour": 1}, "sync.colour"),
], ids=["port", "peer", "bind", "unix-peer-tcp-bind", "tcp-peer-unix-bind", "unix-dns",
        "timeout", "flush", "type", "unknown"])
def test_sync_section_errors_name_the_key(sync: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"sync": sync})
    assert str(caught.value).startswith(path), str(caught.value)


def test_wire_round_trip_and_malformed_messages() -> None:
    import msgpack

    from policies.replica_sync import Dispatch, State
    from policies.types import BackendScore, Decision, DecodeEstimate, Prediction, RouteRequest
    from router.sync.wire import WireError, decode, encode

    request = RouteRequest(request_id="r1", model="m", prompt_tokens=40, prompt_text="hi",
                           block_hashes=(2**64 - 1, 7), tokens_exact=True)
    # The typed prediction travels too: a peer's kv_aware records pending prefill from it.
    decision = Decision("http://b", "kv_aware", 32, prefill_backend_id="http://p", scores=(
        BackendScore("http://p", 0.5, 32, {"ttft_s": 0.1, "prefill_s": 0.05},
                     prediction=Prediction(0.1, 0.05, 8.0, 40, True, 4096)),
        BackendScore("http://b", 0.2, 0, {"decode_score_s": 0.2},
                     decode=DecodeEstimate(0.01, 0.15, 0.0, 3)),))
    sent = [Dispatch("a", 1, 10.0, 1, request, decision),
            State("a", 2, 10.5, 1, (("http://b", 1, 40),),
                  {"http://p": [0.1, 0.0, 8.0, 40.0, 0.05, 8.0, 72.0]}),
            State("a", 3, 11.0, 1)]
    for message in sent:
        # Sender's monotonic 100 s = its unix 1000 s; the receiver's monotonic 50 s = unix 1001 s.
        data = encode(message, monotonic_now_s=100.0, unix_now_s=1000.0)
        got = decode(data, monotonic_now_s=50.0, unix_now_s=1001.0)
        assert got == type(message)(**{**{f: getattr(message, f) for f in message.__slots__},
                                       "sent_at_s": message.sent_at_s - 100.0 + 49.0})
    # An older peer that does not know a field, and a newer one that sends an extra field.
    body = msgpack.unpackb(encode(sent[0], monotonic_now_s=0, unix_now_s=0))
    del body[5]["salted"]
    body[6]["future_field"] = 1
    got = decode(msgpack.packb(body), monotonic_now_s=0, unix_now_s=0)
    assert isinstance(got, Dispatch) and got.request.block_hashes == (2**64 - 1, 7)
    for bad in (b"\xc1", msgpack.packb(["x", "a", 1, 0.0, 1]), msgpack.packb(["f", "a", 1]),
                msgpack.packb(["h", "a", 1, 0.0, 2, [[1, "http://b", 3]]]),  # version 1
                msgpack.packb(["s", "a", 1, 0.0, 2, [[1, 2, 3]], None]),
                msgpack.packb(["s", "a", 1, 0.0, 2, [], ["not", "a", "map"]]),
                msgpack.packb(["d", "a", 1, 0.0, 1, {"prompt_tokens": 1}, {}])):
        with pytest.raises(WireError):
            decode(bad, monotonic_now_s=0, unix_now_s=0)
