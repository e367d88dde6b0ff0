"""Emulator throughput benchmark: requests/s one `kvrouter emulate` process sustains on short
requests, beside a same-run baseline (a bare aiohttp server answering a fixed completion, the
HTTP ceiling of this machine and client).

The emulator runs in its own process (one pod, KV events on, a fast time scale so the engine
model's virtual GPU time is not the limit); a closed-loop aiohttp client in this process keeps
C requests in flight for D seconds per cell, alternating targets over R rounds (the median
is reported, so a burst of load from other sessions does not decide the comparison). Prompts
are short (~25 tokens), half of them sharing a prefix, max_tokens 4; cells: non-streaming and
streaming.

    .venv/bin/python bench/emulator.py [--seconds 3] [--rounds 5] [--concurrency 64]

It first times the engine model alone, as the cluster simulator drives it: 5,000 requests of
12,000 prompt tokens (100 shared 8k-token prefixes, 512-token blocks) and 200 output tokens
each, spread over 16 engines of the default H200 8B profile, stepped until drained.

Compare figures only within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from kvrouter.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llama"


def serve_baseline(port: int) -> None:
    body = json.dumps(
        {
            "id": "cmpl-0",
            "object": "text_completion",
            "model": MODEL,
            "choices": [{"index": 0, "text": " the cache block router", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34},
        }
    ).encode()

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        if (await request.json()).get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for _ in range(4):
                await response.write(b'data: {"choices":[{"text":" x"}]}\n\n')
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.Response(body=body, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def wait_healthy(url: str, timeout_s: float = 120.0, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url + path) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy")


async def load(url: str, seconds: float, concurrency: int, stream: bool) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                i = next(counter)
                prefix = "shared system prompt of the benchmark " if i % 2 else f"user {i} "
                body = {
                    "model": MODEL,
                    "prompt": f"{prefix}question number {i} about caches?",
                    "max_tokens": 4,
                    "stream": stream,
                }
                t0 = time.perf_counter()
                try:
                    async with s.post(url + "/v1/completions", json=body) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "req_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "errors": errors,
        "requests": len(latencies),
    }


async def scrape_hits(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    queries = values.get("vllm:prefix_cache_queries_total", 0.0)
    hits = values.get("vllm:prefix_cache_hits_total", 0.0)
    return f"{hits / queries:.2f}" if queries else "n/a"


def start(cmd: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def engine_model_cell(requests: int = 5000, engines: int = 16) -> None:
    import random

    from simulator.engine.cost_model import load_cost_model
    from simulator.engine.model import EngineConfig, EngineModel, EngineRequest

    cost = load_cost_model()
    config = EngineConfig(block_size=512, num_gpu_blocks=cost.num_gpu_blocks(512))
    fleet = [EngineModel(config, cost, f"engine-{i}") for i in range(engines)]
    rng = random.Random(0)
    t0 = time.perf_counter()
    for r in range(requests):
        group = rng.randrange(100)
        keys = tuple(
            [group * 1000 + j for j in range(16)] + [10**9 + r * 100 + j for j in range(7)]
        )
        fleet[r % engines].add_request(EngineRequest(f"r{r}", 12_000, 200, keys), 0.0)
    steps = 0
    events = 0
    virtual_s = 0.0
    for engine in fleet:
        now = 0.0
        while (result := engine.step(now)) is not None:
            now = result.end_s
            steps += 1
            events += len(result.events)
        virtual_s = max(virtual_s, now)
    wall_s = time.perf_counter() - t0
    hits = sum(e.prefix_cache_hits_tokens for e in fleet)
    queries = sum(e.prefix_cache_queries_tokens for e in fleet)
    print(
        f"engine model: {requests} requests x 12k tokens on {engines} engines: {wall_s:.2f} s wall, "
        f"{steps} steps ({1e6 * wall_s / steps:.0f} us/step), {events} KV events, "
        f"{virtual_s:.0f} virtual s, hit ratio {hits / queries:.2f}, "
        f"{sum(e.num_preemptions for e in fleet)} preemptions"
    )


async def main(args: argparse.Namespace) -> None:
    emu_port, base_port = free_port(), free_port()
    emulator = start(
        [
            sys.executable, "-m", "kvrouter.cli", "emulate", "--count", "1",
            "--port", str(emu_port), "--time-scale", str(args.time_scale),
        ]
    )  # fmt: skip
    baseline = start([sys.executable, __file__, "--serve-baseline", str(base_port)])
    try:
        targets = {
            "baseline (fixed answer)": f"http://127.0.0.1:{base_port}",
            "emulator (1 pod)": f"http://127.0.0.1:{emu_port}",
        }
        for url in targets.values():
            await wait_healthy(url)
        print(
            f"concurrency {args.concurrency}, {args.rounds} interleaved rounds of "
            f"{args.seconds:g} s per cell, time scale {args.time_scale:g}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'target':<26}{'mode':<12}{'req/s median':>13}{'(min-max)':>14}"
            f"{'p50 ms':>9}{'errors':>8}"
        )
        for stream in (False, True):
            # Rounds alternate between the targets so load from other sessions hits both alike.
            rounds: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    rounds[name].append(await load(url, args.seconds, args.concurrency, stream))
            mode = "stream" if stream else "non-stream"
            for name, results in rounds.items():
                rates = sorted(r["req_s"] for r in results)
                p50 = statistics.median(r["p50_ms"] for r in results)
                errors = sum(r["errors"] for r in results)
                spread = f"({rates[0]:.0f}-{rates[-1]:.0f})"
                print(
                    f"{name:<26}{mode:<12}{statistics.median(rates):>13.0f}{spread:>14}"
                    f"{p50:>9.1f}{errors:>8.0f}"
                )
        print(f"emulator prefix-cache hit ratio: {await scrape_hits(targets['emulator (1 pod)'])}")
    finally:
        for proc in (emulator, baseline):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--time-scale", type=float, default=1000.0)
    parser.add_argument("--serve-baseline", type=int, default=0, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.serve_baseline:
        serve_baseline(cli.serve_baseline)
    else:
        engine_model_cell()
        asyncio.run(main(cli))
