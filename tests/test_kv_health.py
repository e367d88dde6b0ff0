"""A backend that fails its health checks loses its index entries, and regains them by replay
once healthy again: a crashed engine's cache must not attract prefix traffic after it returns."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
from aiohttp import web

from router.app import create_app, serve
from router.config import parse_config
from router.setup.kv import build_kv
from simulator.emulator.fleet import EmulatedCluster
from simulator.emulator.http import build_app
from simulator.tiny_tokenizer import default_path

MODEL = "tiny-llama"


async def _until(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_unhealthy_backend_is_purged_then_replayed_when_back() -> None:
    async with EmulatedCluster(count=2, model=MODEL, block_size=16, time_scale=20.0,
                               tokenizer=default_path()) as cluster:
        config = parse_config({
            "backends": [{"url": u} for u in cluster.urls],
            "policy": {"name": "kv_aware", "seed": 3},
            "health": {"interval_s": 0.1, "unhealthy_threshold": 1, "healthy_threshold": 1},
            "models": {MODEL: {"tokenizer": str(default_path()), "block_size": 16}},
            "kv_events": {"scrape_interval_s": 0.2, "discover_interval_s": 0.2},
        })
        plumbing = build_kv(config)
        rng = random.Random(3)
        app = create_app(config, analyzer=plumbing.analyzer, index=plumbing.index,
                         policy=plumbing.policy(rng), rng=rng, background=[plumbing.background])
        runner, _port = await serve(app, "127.0.0.1", 0)
        pool = app.state.pool
        target = cluster.urls[1]
        pod = cluster.pods[1]
        try:
            await _until(lambda: all(b.kv_events for b in pool), "KV event sources")
            async with aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "a shared system prompt " * 40, "max_tokens": 2}
                async with session.post(f"{target}/v1/completions", json=body) as r:
                    assert r.status == 200
                other_body = {"model": MODEL, "prompt": "another prefix entirely " * 40,
                              "max_tokens": 2}
                async with session.post(f"{cluster.urls[0]}/v1/completions",
                                        json=other_body) as r:
                    assert r.status == 200
            held = len(pod.engine.cached_keys())
            assert held > 0 and len(cluster.pods[0].engine.cached_keys()) > 0
            await _until(lambda: plumbing.index.backend_entries(target) == held,
                         "the pod's blocks in the index")

            # The pod's HTTP side goes away (its health checks fail) while its engine and KV
            # publisher live on: the router cannot tell a blip from a crash, so it forgets.
            backend = pool.get(target)
            assert backend is not None
            # Tear down the pod's HTTP server (connections included), keeping its engine and KV
            # publisher: the router cannot tell this blip from a crash, so it forgets.
            await cluster._runners[1].cleanup()
            await _until(lambda: not backend.healthy, "the pod to turn unhealthy")
            await _until(lambda: plumbing.index.backend_entries(target) == 0,
                         "the unhealthy pod's entries to be purged")
            other = pool.get(cluster.urls[0])
            assert other is not None and other.healthy
            assert plumbing.index.backend_entries(cluster.urls[0]) == len(
                cluster.pods[0].engine.cached_keys())

            # Back on the same port with its cache intact: replay restores its entries.
            revived = web.AppRunner(build_app(pod), access_log=None, shutdown_timeout=1.0)
            await revived.setup()
            cluster._runners[1] = revived  # the cluster's close() cleans it up
            host, port = target.removeprefix("http://").split(":")
            await web.TCPSite(revived, host, int(port)).start()
            await _until(lambda: backend.healthy, "the pod to be healthy again")
            await _until(lambda: plumbing.index.backend_entries(target) == held,
                         "the replayed entries")
        finally:
            await runner.cleanup()
