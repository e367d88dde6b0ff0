"""Replay through the real router (kv_aware, KV events, scrape) in front of emulated pods: the
client sees which backend served each request and the pods' own cached tokens."""

from __future__ import annotations

import asyncio
import random
import time

from router.app import create_app, serve
from router.config import parse_config
from router.setup.kv import build_kv
from simulator.emulator.fleet import EmulatedCluster
from simulator.replay import ReplayConfig, TokenBlocks, replay
from simulator.tiny_tokenizer import default_path
from simulator.workloads import parse_synthetic, synthetic

MODEL = "tiny-llama"


async def test_replay_through_the_router_splits_by_backend_and_hits() -> None:
    async with EmulatedCluster(count=2, model=MODEL, block_size=16, time_scale=20.0,
                               max_model_len=4096) as cluster:
        config = parse_config({
            "backends": [{"url": u} for u in cluster.urls],
            "policy": {"name": "kv_aware", "seed": 3},
            "models": {MODEL: {"tokenizer": str(default_path()), "block_size": 16}},
            "kv_events": {"scrape_interval_s": 0.2, "discover_interval_s": 0.2},
        })
        plumbing = build_kv(config)
        rng = random.Random(3)
        app = create_app(config, analyzer=plumbing.analyzer, index=plumbing.index,
                         policy=plumbing.policy(rng), rng=rng, background=[plumbing.background])
        runner, port = await serve(app, "127.0.0.1", 0)
        try:
            deadline = time.monotonic() + 30
            while not all(b.kv_events for b in app.state.pool):
                assert time.monotonic() < deadline, "KV event sources never came up"
                await asyncio.sleep(0.05)
            name, params = parse_synthetic(
                "synthetic:multi_tenant,requests=40,rate=20,tenants=4,block_size=16,"
                "prompt_min_tokens=300,prompt_max_tokens=600,user_min_tokens=10,"
                "user_max_tokens=40,output_min_tokens=2,output_max_tokens=6"
            )
            replay_config = ReplayConfig(target=f"http://127.0.0.1:{port}", model=MODEL,
                                         timeout_s=60, latency_scale=20.0)
            result = await replay(synthetic(name, params, 1), replay_config,
                                  TokenBlocks(2048, 5, 0), label="router")
        finally:
            await runner.cleanup()
    assert result["requests"] == 40 and result["failed"] == 0
    assert set(result["routed_by_backend"]) == set(cluster.urls)
    # Four tenants' system prompts, reused: the pods report cached tokens for most of them.
    assert result["hit_rate"] > 0.4
    assert result["hit_rate"] <= result["oracle_hit_rate"] + 1e-9
