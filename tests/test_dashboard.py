"""Every metric the Grafana dashboard queries is one the router or the engines really export.

A router is started in-process the way ``kvrouter serve`` builds it (KV plumbing, tokenizing
analyzer, kv_aware, discovery) in front of emulated vLLM pods, traffic goes through it, and
the names in its ``/metrics`` and in a vLLM and an SGLang pod's ``/metrics`` are compared with every name in
the dashboard's queries. A name nobody exports fails the test with the list of culprits:
a panel would otherwise stay empty in production without anyone noticing.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from router.config import parse_config
from router.setup.discovery import discovery_background
from router.setup.kv import build_kv
from simulator.emulator.fleet import EmulatedCluster
from simulator.tiny_tokenizer import default_path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(kvrouter_[a-z0-9_]+|vllm:[a-z0-9_:]+|sglang:[a-z0-9_:]+)")
MODEL = "tiny-llama"


def queried_names(dashboard: dict[str, Any]) -> set[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    return {m for expr in exprs for m in METRIC.findall(expr)}


def exported_names(text: str) -> set[str]:
    """Sample names, plus the series a declared family can have before its first sample."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "summary": ("", "_sum", "_count"), "info": ("_info",)}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_every_dashboard_metric_is_exported(
    start_router: Callable[..., Awaitable[Any]], http: aiohttp.ClientSession
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = queried_names(dashboard)
    assert len(wanted) >= 20, wanted
    async with EmulatedCluster(count=2, time_scale=50.0, model=MODEL) as cluster:
        port = cluster.urls[0].rsplit(":", 1)[1]
        config = parse_config({
            "backends": [{"url": u} for u in cluster.urls],
            "policy": {"name": "kv_aware", "seed": 1},
            "models": {MODEL: {"tokenizer": str(default_path()), "block_size": 16}},
            "kv_events": {"scrape_interval_s": 0.2, "discover_interval_s": 0.2},
            # DNS discovery of an address the config already lists: its metrics, no new backend.
            "discovery": {"mode": "dns", "dns": {"name": "localhost", "port": int(port),
                                                 "interval_s": 0.5}},
        })
        kv = build_kv(config)
        rng = random.Random(1)
        router = await start_router(
            config, background=[*discovery_background(config, {}), kv.background],
            analyzer=kv.analyzer, index=kv.index, policy=kv.policy(rng), rng=rng)
        text = "The same long system prompt for every request. " * 20
        for i in range(6):
            async with http.post(f"{router.url}/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 4, "stream": i % 2 == 1,
                "messages": [{"role": "system", "content": text},
                             {"role": "user", "content": f"question {i}"}],
            }) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        async with http.post(f"{router.url}/v1/completions",
                             json={"model": "no-such-model", "prompt": "x"}) as resp:
            assert resp.status >= 400
        await asyncio.sleep(1.0)  # a few scrape and discovery rounds
        async with http.get(f"{router.url}/metrics") as resp:
            router_names = exported_names(await resp.text())
        async with http.get(f"{cluster.urls[0]}/metrics") as resp:
            engine_names = exported_names(await resp.text())
    async with EmulatedCluster(count=1, time_scale=50.0, model=MODEL, engine="sglang") as sglang:
        async with http.post(f"{sglang.urls[0]}/v1/completions",
                             json={"model": MODEL, "prompt": text, "max_tokens": 2}) as resp:
            assert resp.status == 200
        async with http.get(f"{sglang.urls[0]}/metrics") as resp:
            engine_names |= exported_names(await resp.text())

    missing_router = sorted(n for n in wanted if n.startswith("kvrouter_") and n not in router_names)
    missing_engine = sorted(n for n in wanted if not n.startswith("kvrouter_")
                            and n not in engine_names)
    assert not missing_router, f"the dashboard queries names the router does not export: {missing_router}"
    assert not missing_engine, f"the dashboard queries names the engines do not export: {missing_engine}"
