"""Two router replicas fed by the same engines, with no coordination between them.

Four emulated vLLM pods (real HTTP servers, real ZMQ KV-event publishers) are listed as pods by
the fake Kubernetes API. Each replica discovers them, asks each pod's ``/kv_event_sources``,
subscribes to every engine's events and routes with ``kv_aware`` from its own index; once wired
exactly as ``kvrouter serve`` does, once through discovery's own event-sources hook. The workload alternates between the replicas. Checked:

- both indexes agree, block for block, on what every backend holds;
- a prefix first routed by one replica is found by the other: later turns of a group land on
  the backend that cached it whichever replica routes them (affinity across replicas);
- new prefixes spread over the backends instead of collapsing onto one (no herding), both when
  sent one after the other and when both replicas get a burst at the same time.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fake_backend import RouterHandle, wait_for
from fake_kube import FakeKube, make_pod

from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.index import PrefixIndex
from policies.types import RouteRequest
from router.config import parse_config
from router.kv.events import KvEventIngestor
from router.kv.metrics import KvMetrics
from router.prompt.analyzer import RequestFields
from router.setup.discovery import discovery_background, ingestion_hook
from router.setup.kv import build_kv
from simulator.emulator.fleet import EmulatedCluster
from simulator.tiny_tokenizer import default_path

MODEL = "tiny-llama"
BLOCK = 16
PREFIX_TOKENS = 2048  # long enough that a cached prefix clearly beats a cold backend
GROUPS = 8


class TokenIdAnalyzer:
    """Prompts sent as token ids, hashed with the router's own block hasher: what the
    tokenizing analyzer does once it has the ids, without needing the tokenizer here."""

    def __init__(self) -> None:
        self.hasher = BlockHasher(Namespace(MODEL), BLOCK)

    async def analyze(self, fields: RequestFields) -> RouteRequest:
        assert fields.prompt_token_ids is not None, "this test sends token-id prompts"
        ids = fields.prompt_token_ids
        return RouteRequest(
            request_id=fields.request_id, model=fields.model, prompt_tokens=len(ids),
            block_hashes=self.hasher.hash_tokens(ids), block_size=BLOCK,
            max_tokens=fields.max_tokens or 16, stream=fields.stream, tokens_exact=True,
        )




class Replica:
    def __init__(self, handle: RouterHandle, index: PrefixIndex) -> None:
        self.handle = handle
        self.index = index

    def holders(self, hashes: tuple[int, ...]) -> dict[str, int]:
        return {b: m.gpu_blocks for b, m in self.index.match(hashes).items()}


async def start_replica(
    start_router: Callable[..., Awaitable[RouterHandle]], kubeconfig: Path, seed: int,
    wiring: str,
) -> Replica:
    """``serve``: built exactly as ``kvrouter serve`` builds it (KV plumbing asking each
    discovered pod's /kv_event_sources). ``hook``: discovery itself asks and subscribes the
    ingestor through its event-sources hook."""
    discovery = {"mode": "kubernetes", "kubernetes": {
        "kubeconfig": str(kubeconfig), "label_selector": "app=vllm",
        "ask_event_sources": wiring == "hook"}}
    raw: dict[str, Any] = {"policy": {"name": "kv_aware", "seed": seed},
                           "health": {"interval_s": 0.5}, "discovery": discovery}
    if wiring == "serve":
        raw["kv_events"] = {"discover_interval_s": 0.1, "scrape_interval_s": 0.5}
        raw["models"] = {MODEL: {"tokenizer": str(default_path()), "block_size": BLOCK}}
        config = parse_config(raw)
        kv = build_kv(config)
        rng = random.Random(seed)
        handle = await start_router(
            config, background=[*discovery_background(config, {}), kv.background],
            analyzer=kv.analyzer, index=kv.index, policy=kv.policy(rng), rng=rng)
        return Replica(handle, kv.index)

    config = parse_config(raw)
    index = PrefixIndex()
    ingestors: list[KvEventIngestor] = []

    def ingestion(state: Any) -> Any:
        def live(backend_id: str) -> None:
            backend = state.pool.get(backend_id)
            if backend is not None:
                backend.kv_events = True

        ingestor = KvEventIngestor(index, [], KvMetrics(state.metrics.registry),
                                   on_backend_live=live)
        ingestors.append(ingestor)
        return ingestor.run()

    def to_ingestor(backend_id: str, sources: Any) -> None:
        ingestion_hook(ingestors[0])(backend_id, sources)

    # Ingestion first: discovery subscribes sources to a running ingestor.
    background = [ingestion, *discovery_background(config, {}, on_event_sources=to_ingestor)]
    handle = await start_router(config, index=index, analyzer=TokenIdAnalyzer(),
                                background=background)
    return Replica(handle, index)


@pytest.fixture(params=["serve", "hook"])
async def fleet(
    request: pytest.FixtureRequest, tmp_path: Path,
    start_router: Callable[..., Awaitable[RouterHandle]],
) -> Any:
    async with EmulatedCluster(count=4, time_scale=50.0, model=MODEL, block_size=BLOCK,
                               num_gpu_blocks=4096) as cluster:
        kube = FakeKube(token="t")
        await kube.start()
        try:
            for i, url in enumerate(cluster.urls):
                await kube.apply(make_pod(f"engine-{i}", "127.0.0.1", labels={"app": "vllm"},
                                          annotations={"kvrouter.io/port": url.rsplit(":", 1)[1],
                                                       "kvrouter.io/model": MODEL}))
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": kube.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
            }))
            replicas = [await start_replica(start_router, kubeconfig, seed, request.param)
                        for seed in (11, 22)]
            for replica in replicas:
                pool = replica.handle.state.pool
                await wait_for(lambda pool=pool: {b.url for b in pool} == set(cluster.urls)
                               and all(b.kv_events for b in pool), "pods discovered, events live")
            yield cluster, replicas
        finally:
            await kube.stop()


async def send(http: aiohttp.ClientSession, replica: Replica, ids: list[int]) -> str:
    async with http.post(f"{replica.handle.url}/v1/completions",
                         json={"model": MODEL, "prompt": ids, "max_tokens": 2}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["x-kvrouter-backend"]


async def test_two_replicas_agree_on_the_index_and_spread_without_herding(
    fleet: Any, http: aiohttp.ClientSession
) -> None:
    cluster, replicas = fleet
    rng = random.Random(5)
    hasher = BlockHasher(Namespace(MODEL), BLOCK)
    prefixes = [[rng.randrange(100, 2000) for _ in range(PREFIX_TOKENS)] for _ in range(GROUPS)]
    prefix_hashes = [hasher.hash_tokens(p) for p in prefixes]
    full = PREFIX_TOKENS // BLOCK

    def turn(g: int) -> list[int]:
        return prefixes[g] + [rng.randrange(100, 2000) for _ in range(BLOCK)]

    # New prefixes, one after the other, alternating replicas. Each lands somewhere; both
    # replicas then learn where from that engine's own events.
    holder: dict[int, str] = {}
    for g in range(GROUPS):
        holder[g] = await send(http, replicas[g % 2], turn(g))
        await wait_for(lambda g=g: all(r.holders(prefix_hashes[g]).get(holder[g]) == full
                                       for r in replicas), f"group {g} indexed by both")
    spread = Counter(holder.values())
    assert len(spread) >= 3 and max(spread.values()) <= 4, f"new prefixes herded: {spread}"

    # Later turns of every group, routed by the replica that did NOT see the first one too.
    followed = []
    for rep in range(3):
        for g in range(GROUPS):
            followed.append(await send(http, replicas[(g + rep + 1) % 2], turn(g)) == holder[g])
    assert sum(followed) >= 0.9 * len(followed), f"affinity lost across replicas: {followed}"

    # A burst of new prefixes through both replicas at once: still spread.
    burst = [[rng.randrange(100, 2000) for _ in range(PREFIX_TOKENS)] for _ in range(16)]
    chosen = await asyncio.gather(*(send(http, replicas[i % 2], ids)
                                    for i, ids in enumerate(burst)))
    burst_spread = Counter(chosen)
    assert len(burst_spread) >= 3 and max(burst_spread.values()) <= 8, burst_spread

    # Once the events have settled, both indexes hold exactly what each engine has cached.
    def settled() -> bool:
        return all(r.index.backend_entries(url) == len(pod.engine.cached_keys())
                   for r in replicas for url, pod in zip(cluster.urls, cluster.pods, strict=True))

    await wait_for(settled, "both indexes to match the engines' caches")
    assert replicas[0].index.entries == replicas[1].index.entries > 0
    for hashes in prefix_hashes + [hasher.hash_tokens(ids) for ids in burst]:
        assert replicas[0].holders(hashes) == replicas[1].holders(hashes)
        assert max(replicas[0].holders(hashes).values()) == full
