"""The first cold wave, request by request: 8 new chats at once through each router, in front
of its own fresh emulated pods, as ``bench/quality.py`` starts them.

The tail of the quality bench's light, pressure and agentic regimes is their first wave: 8
cold prompts reach 4 idle pods at once, and the second on each pod waits for the first's
prefill. Every router places them alike (two per pod); what differs is how soon each prompt
reaches its pod. This script sends that wave ``--bursts`` times per router (each burst with
new system prompts, so every prompt is cold, 0.4 s apart so the pods are idle again) and
prints, per router, the median over bursts of the k-th fastest TTFT.

    .venv/bin/python bench/first_wave.py          # kv_aware, round_robin, sglang-router
    .venv/bin/python bench/first_wave.py --routers direct,kvrouter:kv_aware --rounds 3 --pin

``direct`` sends request i to pod i mod 4 without a router: the floor. ``--pin`` places the
processes as ``bench/quality.py --pin`` does (pods on the last CPU, routers and this client on
the others). ``--regime`` picks the quality regime whose prompts are sent (light).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _one
from quality_procs import Emulator, add_pin_option, free_port, make_router, read_pin_option
from quality_workload import REGIMES, build_workload

WAVE = 8
PODS = 4


def first_prompts(regime: str) -> list[dict[str, Any]]:
    """The regime's first ``WAVE`` distinct system prompts, streamed as the bench sends them.
    Agentic: the first ``WAVE`` sessions' first turns, as the bench sends them (4 agent kinds,
    so some share a system prompt and tools)."""
    items = build_workload(REGIMES[regime], 7)
    if REGIMES[regime].agentic:
        return [item.bodies[0] for item in items[:WAVE]]
    seen: set[str] = set()
    out = []
    for item in items:
        body = item.bodies[0]
        key = json.dumps(body["messages"][0])[:80]
        if key not in seen:
            seen.add(key)
            out.append(body)
    return out[:WAVE]


async def burst(session: aiohttp.ClientSession, urls: list[str],
                prompts: list[dict[str, Any]], n: int) -> list[float]:
    """One wave of cold prompts (new words ahead of each system prompt); TTFTs in ms, sorted."""
    rng = random.Random(n)
    heads: dict[str, str] = {}  # one new head per system prompt: shared prompts stay shared
    bodies = []
    for body in prompts:
        body = copy.deepcopy(body)
        system = body["messages"][0]["content"]
        head = heads.setdefault(system, f"wave {n} {rng.random()}")
        body["messages"][0]["content"] = f"{head} {system}"
        bodies.append(body)
    results: list[list[dict[str, Any]]] = [[] for _ in bodies]
    await asyncio.gather(*(
        _one(session, f"{urls[i % len(urls)]}/v1/chat/completions", body, results[i], "wave")
        for i, body in enumerate(bodies)))
    ttfts = [r[0]["ttft_s"] * 1e3 for r in results if r and r[0]["ok"]]
    if len(ttfts) != len(bodies):
        raise RuntimeError(f"wave {n}: {len(bodies) - len(ttfts)} requests failed")
    return sorted(ttfts)


async def run(name: str, args: argparse.Namespace, logdir: Path) -> list[list[float]]:
    tag = name.replace(":", "-").replace("/", "_")
    pods = Emulator(PODS, REGIMES[args.regime].num_gpu_blocks, None,
                    logdir / f"{tag}-pods.log", cpus=args.pod_cpus)
    router = None
    try:
        await pods.start()
        urls = pods.urls
        if name != "direct":
            router = make_router(name, logdir / f"{tag}-router.log", 1, args.router_cpus)
            await router.start(pods, free_port())
            urls = router.urls
        prompts = first_prompts(args.regime)
        waves = []
        async with aiohttp.ClientSession() as session:
            for n in range(args.bursts):
                waves.append(await burst(session, urls, prompts, n))
                await asyncio.sleep(0.4)
        return waves
    finally:
        if router is not None:
            await router.stop()
        await pods.stop()


async def main_async(args: argparse.Namespace) -> None:
    if args.router_cpus is not None:
        os.sched_setaffinity(0, args.router_cpus)
    logdir = Path(tempfile.mkdtemp(prefix="kvwave-"))
    waves: dict[str, list[list[float]]] = {name: [] for name in args.router_list}
    for _ in range(args.rounds):  # routers take turns, so drifting load falls on all alike
        for name in args.router_list:
            waves[name] += await run(name, args, logdir)
    print(f"{args.regime}: the k-th fastest TTFT of a wave of {WAVE} cold chats, ms, median of "
          f"{args.bursts * args.rounds} waves{' (pinned)' if args.pin else ''}")
    print(f"{'router':28s} " + " ".join(f"{k:>6d}" for k in range(1, WAVE + 1)))
    for name, runs in waves.items():
        medians = [statistics.median(w[k] for w in runs) for k in range(WAVE)]
        print(f"{name:28s} " + " ".join(f"{m:6.1f}" for m in medians))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", default="kvrouter:kv_aware,kvrouter:round_robin,"
                                        "sglang-router:cache_aware",
                   help="comma-separated: direct, or any router bench/quality.py takes")
    p.add_argument("--regime", default="light", choices=sorted(REGIMES))
    p.add_argument("--bursts", type=int, default=10, help="waves per router and round")
    p.add_argument("--rounds", type=int, default=2)
    add_pin_option(p)
    args = p.parse_args(argv)
    args.router_list = [r for r in args.routers.split(",") if r]
    read_pin_option(p, args)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
