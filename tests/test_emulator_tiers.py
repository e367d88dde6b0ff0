"""Emulated pods with KV tiers (issue 18): vLLM native CPU offloading (CPU-medium events on the
wire, the right cached_tokens, the pods' counters) and a fleet-shared store in a real
redis-server (REMOTE events, a prefix one pod computed served to another from the store),
each checked through the router's own wire decoder and PrefixIndex."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex
from router.kv.wire import decode_live
from simulator.emulator.fleet import EmulatedCluster
from simulator.emulator.store import RedisBlockStore, RedisServer

MODEL = "tiny-llama"
BS = 16
HASHER = BlockHasher(Namespace(MODEL), BS)
needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and shutil.which("valkey-server") is None,
    reason="no redis-server/valkey-server on PATH (apt-get install redis-server)")


def text(seed: int, words: int) -> str:
    return " ".join(f"topic{seed} word{i % 97} item{i}" for i in range(words))


async def complete(s: aiohttp.ClientSession, url: str, prompt: str) -> dict[str, Any]:
    async with s.post(url + "/v1/completions",
                      json={"model": MODEL, "prompt": prompt, "max_tokens": 2}) as r:
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


def cached(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


class Listener:
    """Every pod's KV events, decoded by the router's decoder into one PrefixIndex."""

    def __init__(self, cluster: EmulatedCluster) -> None:
        self.ctx = zmq.asyncio.Context()
        self.index = PrefixIndex()
        self.events: list[Any] = []
        self.socks = []
        for i, endpoint in enumerate(cluster.kv_endpoints):
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(endpoint)
            self.socks.append((f"pod-{i}", sock))
            self.index.set_backend_model(f"pod-{i}", MODEL)

    async def drain(self, settle_s: float = 0.5) -> None:
        while True:
            got = False
            for backend, sock in self.socks:
                while await sock.poll(timeout=int(settle_s * 1000)):
                    batch = decode_live(await sock.recv_multipart()).batch
                    for event in batch.events:
                        self.events.append((backend, event))
                        self.index.apply(backend, event, 0.0)
                    got = True
            if not got:
                return

    def close(self) -> None:
        for _, sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    if shutil.which("redis-server") is None and shutil.which("valkey-server") is None:
        pytest.skip("no redis-server/valkey-server on PATH (apt-get install redis-server)")
    server = RedisServer()
    url = await server.start()
    try:
        yield url
    finally:
        await server.stop()


async def test_cpu_offload_pod_announces_cpu_blocks_and_serves_them_back() -> None:
    async with EmulatedCluster(count=1, time_scale=200.0, num_gpu_blocks=48,
                               cpu_offload_tokens=20_000) as cluster:
        listener = Listener(cluster)
        await asyncio.sleep(0.3)  # SUB sockets connect
        try:
            async with aiohttp.ClientSession() as s:
                url = cluster.urls[0]
                a, b = text(1, 60), text(2, 70)
                first = await complete(s, url, a)
                await complete(s, url, b)  # evicts a from the 48-block HBM
                again = await complete(s, url, a)
                async with s.get(url + "/metrics") as r:
                    metrics = await r.text()
            await listener.drain()
        finally:
            listener.close()
    prompt_tokens = first["usage"]["prompt_tokens"]
    full = (prompt_tokens - 1) // BS * BS
    assert cached(first) == 0 and cached(again) == full  # loaded from CPU, not recomputed
    engine = cluster.pods[0].engine
    assert engine.cpu_hit_tokens > full // 2  # most of it came back from the CPU tier
    assert engine.cpu_hit_tokens + engine.prefix_cache_hits_tokens == full
    media = {e.medium for _, e in listener.events if hasattr(e, "medium")}
    assert "CPU" in media
    ids = cluster.pods[0].codec.encode(a)
    found = listener.index.match(HASHER.hash_tokens(ids))["pod-0"]
    assert found.matched_blocks >= full // BS and found.cpu_blocks + found.gpu_blocks > 0
    assert 'emulator:tier_hit_tokens_total{engine="0",model_name="tiny-llama",tier="cpu"}' in metrics
    assert "vllm:external_prefix_cache_hits_total" in metrics


@needs_redis
async def test_a_shared_store_in_redis_serves_one_pods_prefix_to_another(redis_url: str) -> None:
    async with EmulatedCluster(count=2, time_scale=200.0, shared_store_tokens=50_000,
                               shared_store_url=redis_url) as cluster:
        listener = Listener(cluster)
        await asyncio.sleep(0.3)
        try:
            async with aiohttp.ClientSession() as s:
                prompt = text(3, 80)
                first = await complete(s, cluster.urls[0], prompt)
                await listener.drain()
                other = await complete(s, cluster.urls[1], prompt)
            await listener.drain()
        finally:
            listener.close()
        size = await cluster.stores[0].size()
    full = (first["usage"]["prompt_tokens"] - 1) // BS * BS
    assert cached(first) == 0 and cached(other) == full
    assert cluster.pods[1].engine.shared_hit_tokens == full
    remote = [(b, e) for b, e in listener.events if getattr(e, "locality", None) == "REMOTE"]
    assert remote and remote[0][0] == "pod-0"
    ids = cluster.pods[0].codec.encode(prompt)
    hashes = HASHER.hash_tokens(ids)
    # Kept once for the fleet, loadable by every pod: also by one that never held it.
    assert listener.index.shared_prefix(hashes) >= full // BS
    assert listener.index.shared_blocks == size


@needs_redis
async def test_the_store_script_reports_new_and_evicted_blocks(redis_url: str) -> None:
    store = RedisBlockStore(redis_url, capacity_blocks=3, name="t")
    await store.start()
    try:
        assert await store.write([1, 2]) == ([1, 2], [])
        assert await store.write([1, 2, 3, 4]) == ([3, 4], [4])  # the chain's tail goes first
        assert await store.lookup([1, 2, 3, 4]) == [True, True, True, False]
    finally:
        await store.clear()
        await store.close()


@needs_redis
async def test_router_debug_route_shows_cpu_and_shared_tiers_of_live_pods(redis_url: str) -> None:
    import random
    import time

    from router.app import create_app, serve
    from router.config import parse_config
    from router.setup.kv import build_kv
    from simulator.tiny_tokenizer import default_path

    async with EmulatedCluster(count=2, time_scale=200.0, num_gpu_blocks=48,
                               cpu_offload_tokens=20_000, shared_store_tokens=50_000,
                               shared_store_url=redis_url, tokenizer=default_path()) as cluster:
        config = parse_config({
            "backends": [{"url": u} for u in cluster.urls],
            "policy": {"name": "kv_aware", "seed": 7},
            "models": {MODEL: {"tokenizer": str(default_path()), "block_size": BS}},
            "kv_events": {"scrape_interval_s": 0.2, "discover_interval_s": 0.2},
        })
        plumbing = build_kv(config)
        rng = random.Random(7)
        app = create_app(config, analyzer=plumbing.analyzer, index=plumbing.index,
                         policy=plumbing.policy(rng), rng=rng, background=[plumbing.background])
        runner, port = await serve(app, "127.0.0.1", 0)
        router = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while not all(b.kv_events for b in app.state.pool):
                assert time.monotonic() < deadline, "KV event sources never came up"
                await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as s:
                a = text(4, 60)
                await complete(s, cluster.urls[0], a)           # pod 0 computes a, writes it
                await complete(s, cluster.urls[0], text(5, 70))  # ... and evicts it from HBM
                body = {"model": MODEL, "prompt": a, "max_tokens": 2}
                deadline = time.monotonic() + 20
                while True:
                    async with s.post(router + "/debug/route", json=body) as r:
                        assert r.status == 200, await r.text()
                        explained = await r.json()
                    tiers = explained["index"]["backends"]
                    pod0 = tiers.get(cluster.urls[0], {})
                    if pod0.get("cpu_blocks") and explained["index"]["shared_prefix_blocks"]:
                        break
                    assert time.monotonic() < deadline, explained["index"]
                    await asyncio.sleep(0.05)
        finally:
            await runner.cleanup()
    blocks = explained["index"]["blocks"]
    assert explained["index"]["shared_prefix_blocks"] >= blocks - 1
    # Pod 1 never saw the prompt, yet holds it at the shared tier's price.
    terms = {sc["backend_id"]: sc["terms"] for sc in explained["decision"]["scores"]}
    assert terms[cluster.urls[1]]["shared_tokens"] > 0
    assert terms[cluster.urls[0]]["cpu_tokens"] > 0
