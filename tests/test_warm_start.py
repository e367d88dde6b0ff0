"""Warm start against the engines' truth: router replicas (real HTTP, real ZMQ) in front of
emulated vLLM pods whose replay buffers hold only the last few event batches.

- A fresh replica that loads a warm sibling's snapshot predicts the same hits per backend as
  the sibling, for prefixes older than the engines' replay buffers, and /ready says so only
  once it does; a cold replica (no warm start) knows none of those prefixes.
- A replica loading an older snapshot replays each engine from the snapshot's position: it
  knows both what the snapshot holds and what the engines published after it.
- The snapshot endpoint refuses missing or wrong tokens (401) and a router with no token
  (403), as OpenAI-shaped JSON; a replica whose siblings are down or refuse it starts cold,
  counted, and /ready waits for the fetch to give up.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_backend import RouterHandle, wait_for

from router.config import parse_config
from router.setup.kv import KvPlumbing, build_kv
from router.setup.warm import SNAPSHOT_PATH
from simulator.emulator.fleet import EmulatedCluster
from simulator.tiny_tokenizer import default_path

MODEL = "tiny-llama"
BLOCK = 16
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUFFER_STEPS = 6  # the engines' replay buffers: event batches (scheduler steps) kept
WORDS = ("cache block router prefix engine token decode prefill tenant session agent tool "
         "context memory latency throughput answer question document system").split()

StartRouter = Callable[..., Awaitable[RouterHandle]]


def prompt(name: str, words: int = 120) -> str:
    rng = random.Random(name)
    return f"{name}: " + " ".join(rng.choice(WORDS) for _ in range(words))




def router_config(backend_urls: list[str], **warm: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"admin_token": TOKEN},
        "backends": [{"url": u} for u in backend_urls],
        "policy": {"name": "kv_aware", "seed": 1},
        "health": {"interval_s": 60},
        "models": {MODEL: {"tokenizer": str(default_path()), "block_size": BLOCK}},
        "kv_events": {"discover_interval_s": 0.1, "scrape": False, "replay_timeout_s": 2.0},
    }
    if warm:
        raw["sync"] = {"warm_start": {"enabled": True, **warm}}
    return raw


async def start_kv_router(start_router: StartRouter,
                          raw: dict[str, Any]) -> tuple[RouterHandle, KvPlumbing]:
    config = parse_config(raw)
    kv = build_kv(config)
    rng = random.Random(1)
    handle = await start_router(config, background=[kv.background], analyzer=kv.analyzer,
                                index=kv.index, policy=kv.policy(rng), rng=rng,
                                routes=kv.routes(), ready_checks=[kv.not_ready])
    return handle, kv


async def is_ready(http: aiohttp.ClientSession, handle: RouterHandle) -> bool:
    async with http.get(f"{handle.url}/ready") as resp:
        return resp.status == 200


async def wait_ready(http: aiohttp.ClientSession, handle: RouterHandle,
                     timeout_s: float = 30.0) -> float:
    """Seconds until /ready answered 200."""
    start = time.monotonic()
    while not await is_ready(http, handle):
        assert time.monotonic() - start < timeout_s, "the router never became ready"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def predicted(http: aiohttp.ClientSession, handle: RouterHandle,
                    text: str) -> dict[str, tuple[int, int, int]]:
    """Per backend, the (matched, GPU, CPU) blocks the router's index holds of ``text``."""
    async with http.post(f"{handle.url}/debug/route", headers=AUTH,
                         json={"model": MODEL, "prompt": text, "max_tokens": 1}) as resp:
        assert resp.status == 200, await resp.text()
        index = (await resp.json())["index"] or {"backends": {}}
    return {b: (m["matched_blocks"], m["gpu_blocks"], m["cpu_blocks"])
            for b, m in index["backends"].items()}


async def complete(http: aiohttp.ClientSession, url: str, text: str) -> str:
    async with http.post(f"{url}/v1/completions",
                         json={"model": MODEL, "prompt": text, "max_tokens": 1}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers.get("x-kvrouter-backend", url)


def published(cluster: EmulatedCluster) -> int:
    return sum(p.publisher.published_batches for p in cluster.pods if p.publisher is not None)


def applied(kv: KvPlumbing) -> int:
    return kv.ingestor.applied_batches if kv.ingestor is not None else -1


def counter(kv: KvPlumbing, name: str, labels: dict[str, str] | None = None) -> float:
    total = 0.0
    for metric in kv.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in (labels or {}).items()):
                total += sample.value
    return total


@pytest.fixture
async def cluster() -> Any:
    async with EmulatedCluster(count=2, model=MODEL, block_size=BLOCK, time_scale=50.0,
                               num_gpu_blocks=4096, buffer_steps=BUFFER_STEPS,
                               tokenizer=default_path()) as pods:
        yield pods


async def warm_fleet(http: aiohttp.ClientSession, cluster: EmulatedCluster,
                     a: KvPlumbing, a_url: str, old: list[str]) -> None:
    """``old`` through router A, then enough traffic straight at every pod that the old
    prefixes' batches leave each pod's replay buffer; returns once A applied everything."""
    for text in old:
        await complete(http, a_url, text)
    for i, pod_url in enumerate(cluster.urls):
        for j in range(BUFFER_STEPS + 2):
            await complete(http, pod_url, prompt(f"filler-{i}-{j}", 40))
    await wait_for(lambda: applied(a) == published(cluster), "A applies every batch")


async def test_fresh_replica_predicts_like_the_old_ones_beyond_the_replay_buffer(
    cluster: EmulatedCluster, start_router: StartRouter, http: aiohttp.ClientSession,
) -> None:
    a, a_kv = await start_kv_router(start_router, router_config(cluster.urls))
    await wait_ready(http, a)
    old = [prompt(f"old-{i}") for i in range(6)]
    await warm_fleet(http, cluster, a_kv, a.url, old)
    truth = [await predicted(http, a, text) for text in old]
    assert all(t and max(m for m, _, _ in t.values()) >= 5 for t in truth), truth

    # B finds A as production does: among the sync peers (static here), at A's HTTP port.
    raw = router_config(cluster.urls, http_port=int(a.url.rsplit(":", 1)[1]))
    raw["sync"]["peers"] = ["tcp://127.0.0.1:5601"]
    b, b_kv = await start_kv_router(start_router, raw)
    seconds = await wait_ready(http, b)
    # Ready means caught up: B's predictions equal A's the moment it says so.
    assert [await predicted(http, b, text) for text in old] == truth
    print(f"warm replica ready in {seconds:.2f}s")  # the "within seconds"
    assert counter(b_kv, "kvrouter_kv_warm_starts_total", {"outcome": "warm"}) == 1
    assert counter(b_kv, "kvrouter_kv_warm_start_restored_entries") == a_kv.index.entries
    # What B has that the engines' buffers no longer hold: a replica without warm start
    # (the only way before) knows none of it.
    cold, cold_kv = await start_kv_router(start_router, router_config(cluster.urls))
    await wait_ready(http, cold)
    await wait_for(lambda: counter(cold_kv, "kvrouter_kv_event_replays_total")
                   == len(cluster.urls), "the cold replica's replays")
    assert counter(cold_kv, "kvrouter_kv_event_gaps_unrecovered_total") == len(cluster.urls)
    assert [await predicted(http, cold, text) for text in old] == [{}] * len(old)

    # Events after the join reach B like A.
    fresh = prompt("after-join")
    await complete(http, a.url, fresh)
    await wait_for(lambda: applied(a_kv) == published(cluster), "A applies the new batch")
    await wait_for(lambda: b_kv.index.entries == a_kv.index.entries, "B applies it too")
    assert await predicted(http, b, fresh) == await predicted(http, a, fresh) != {}


@pytest.mark.parametrize("buffer", ["covers", "moved_past"])
async def test_replays_each_engine_from_the_snapshots_position(
    buffer: str, cluster: EmulatedCluster, start_router: StartRouter,
    http: aiohttp.ClientSession,
) -> None:
    """B loads a snapshot taken some batches ago (served by a stand-in sibling).

    ``covers``: the engines' buffers still reach the snapshot's positions; replaying from
    them (not from 0, which the buffers no longer hold) gives B the newer prefixes without
    losing the older ones. ``moved_past``: more batches than a buffer holds followed the
    snapshot; B keeps the snapshot's blocks (counted) instead of clearing them, and takes
    what the buffers still hold."""
    a, a_kv = await start_kv_router(start_router, router_config(cluster.urls))
    await wait_ready(http, a)
    old = [prompt(f"old-{i}") for i in range(4)]
    await warm_fleet(http, cluster, a_kv, a.url, old)
    async with http.get(f"{a.url}{SNAPSHOT_PATH}", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-msgpack"
        stale = await resp.read()
    if buffer == "moved_past":
        for i, pod_url in enumerate(cluster.urls):
            for j in range(BUFFER_STEPS + 2):
                await complete(http, pod_url, prompt(f"later-{i}-{j}", 40))
    newer = [prompt(f"newer-{i}") for i in range(2)]
    for text in newer:
        await complete(http, a.url, text)
    await wait_for(lambda: applied(a_kv) == published(cluster), "A applies the newer batches")

    async def serve_stale(request: web.Request) -> web.Response:
        assert request.headers.get("Authorization") == AUTH["Authorization"]
        return web.Response(body=stale, content_type="application/x-msgpack")

    sibling = web.Application()
    sibling.router.add_get(SNAPSHOT_PATH, serve_stale)
    runner = web.AppRunner(sibling, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        b, b_kv = await start_kv_router(start_router, router_config(cluster.urls, urls=[url]))
        await wait_for(lambda: b_kv.warm.phase != "fetching" and b_kv.ingestor is not None
                       and b_kv.ingestor.catching_up() == 0, "B's replays")
    finally:
        await runner.cleanup()
    # Each backend counts as event-fed (precise) once its replay ended, kept snapshot or not.
    assert all(backend.kv_events for backend in b.state.pool)
    # Caught up, B hands out its own snapshot (whether or not anything asked /ready).
    async with http.get(f"{b.url}{SNAPSHOT_PATH}", headers=AUTH) as resp:
        assert resp.status == 200
    assert await is_ready(http, b)
    for text in old + newer:
        assert await predicted(http, b, text) == await predicted(http, a, text) != {}, text
    uncovered = counter(b_kv, "kvrouter_kv_warm_start_uncovered_streams_total")
    if buffer == "covers":
        assert b_kv.index.entries == a_kv.index.entries
        assert uncovered == 0
    else:
        assert uncovered == len(cluster.urls)  # every engine's buffer had moved on
    assert counter(b_kv, "kvrouter_kv_event_gaps_unrecovered_total") == 0


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


async def test_snapshot_endpoint_refuses_bad_requests(
    start_backend: Callable[..., Awaitable[Any]], start_router: StartRouter,
    http: aiohttp.ClientSession,
) -> None:
    backend = await start_backend()
    a, _ = await start_kv_router(start_router, router_config([backend.url]))
    url = f"{a.url}{SNAPSHOT_PATH}"
    async with http.get(url) as resp:
        assert resp.status == 401
        assert (await error_of(resp))["type"] == "authentication_error"
    async with http.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with http.post(url, headers=AUTH) as resp:
        assert resp.status == 405
    async with http.get(url, headers=AUTH) as resp:
        assert resp.status == 200
    raw = router_config([backend.url])
    del raw["server"]
    open_router, _ = await start_kv_router(start_router, raw)
    async with http.get(f"{open_router.url}{SNAPSHOT_PATH}") as resp:
        assert resp.status == 403
        error = await error_of(resp)
        assert error["code"] == "forbidden" and "admin_token" in error["message"]

    # A replica whose sibling refuses its token starts cold, counted.
    raw = router_config([backend.url], urls=[a.url], timeout_s=0.5)
    raw["server"]["admin_token"] = "other"
    b, b_kv = await start_kv_router(start_router, raw)
    await wait_ready(http, b)
    assert counter(b_kv, "kvrouter_kv_warm_starts_total", {"outcome": "cold"}) == 1
    assert b_kv.index.entries == 0


async def test_sibling_down_starts_cold_after_the_timeout(
    start_backend: Callable[..., Awaitable[Any]], start_router: StartRouter,
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    backend = await start_backend()
    # A sibling that accepts the connection but never answers, then one that is not there.
    hung = web.Application()

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    hung.router.add_get(SNAPSHOT_PATH, hang)
    runner = web.AppRunner(hung, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        raw = router_config([backend.url], urls=[url, "http://127.0.0.1:9"], timeout_s=1.5)
        b, b_kv = await start_kv_router(start_router, raw)
        await asyncio.sleep(0.3)
        async with http.get(f"{b.url}/ready") as resp:
            assert resp.status == 503
            assert "warming up" in (await error_of(resp))["message"]
        async with http.get(f"{b.url}{SNAPSHOT_PATH}", headers=AUTH) as resp:
            assert resp.status == 503  # a warming replica hands out no half-warm snapshot
        await wait_ready(http, b, timeout_s=10.0)
    finally:
        await runner.cleanup()
    assert counter(b_kv, "kvrouter_kv_warm_starts_total", {"outcome": "cold"}) == 1
    assert counter(b_kv, "kvrouter_kv_warm_starts_total", {"outcome": "warm"}) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "kvrouter.warm_start"]
    assert len(lines) == 1 and "starting cold" in lines[0], lines
