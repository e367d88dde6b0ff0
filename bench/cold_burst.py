"""When the requests of a cold burst reach their backends through a fresh kvrouter, with and
without pre-opened upstream connections (`upstream.preconnect`).

Eight distinct ~1,470-token chats (the light regime's system prompts, bench/quality_workload.py)
are sent at once through a fresh `kvrouter serve --policy kv_aware` with the tiny tokenizer, in
front of 4 local backends (a process of their own) that log when each request arrives. Each run starts a new router;
the settings alternate run by run, so drifting machine load falls on all of them alike.

    .venv/bin/python bench/cold_burst.py                 # --preconnect 0,2 --runs 4

Prints, per run, the arrival times (ms after the burst was sent) and each setting's medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from emulator import wait_healthy  # noqa: E402
from quality_workload import REGIMES, build_workload  # noqa: E402

from kvrouter.ports import free_port  # noqa: E402

MODEL = "tiny-llama"
ANSWER = {"id": "x", "object": "chat.completion", "model": MODEL, "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _bodies(count: int) -> list[dict[str, Any]]:
    """The first ``count`` distinct system prompts of the light regime, not streamed."""
    seen: set[str] = set()
    out = []
    for item in build_workload(REGIMES["light"], 7):
        body = item.bodies[0]
        key = body["messages"][0]["content"][:30]
        if key not in seen:
            seen.add(key)
            out.append({**body, "stream": False})
    return out[:count]


async def _serve_backends(ports: list[int]) -> None:
    """The 4 backends, in a process of their own (``cold_burst.py backends PORT...``): arrival
    times must not wait for the client's own event loop. ``GET /arrivals`` on any port answers
    the monotonic clock readings (system-wide on Linux) of every chat so far, and clears them."""
    arrivals: list[float] = []

    async def chat(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        await request.read()
        return web.json_response(ANSWER)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def taken(request: web.Request) -> web.Response:
        out = list(arrivals)
        arrivals.clear()
        return web.json_response(out)

    for port in ports:
        app = web.Application(client_max_size=1 << 26)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/health", models)
        app.router.add_get("/arrivals", taken)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _run(preconnect: int, bodies: list[dict[str, Any]]) -> list[float]:
    ports = [free_port() for _ in range(4)]
    backends = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "backends", *map(str, ports), stdout=asyncio.subprocess.PIPE)
    assert backends.stdout is not None
    await backends.stdout.readline()  # "ready"
    router_port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as config:
        config.write(f"upstream:\n  preconnect: {preconnect}\n")
        config.flush()
        router = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv" / "bin" / "kvrouter"), "serve", "--port", str(router_port),
            "--policy", "kv_aware", "--log-level", "warning", "--config", config.name,
            "--model-tokenizer", f"{MODEL}={ROOT / 'simulator/data/tiny-tokenizer'}",
            *[a for p in ports for a in ("--backend", f"http://127.0.0.1:{p}")])
        base = f"http://127.0.0.1:{router_port}"
        try:
            await wait_healthy(base, 20.0, path="/ready")
            async with aiohttp.ClientSession() as session:
                await asyncio.sleep(1.0)  # the health round and what it opens
                async with session.get(f"http://127.0.0.1:{ports[0]}/arrivals") as response:
                    await response.read()  # (none yet: start clean)
                sent = time.monotonic()

                async def one(body: dict[str, Any]) -> None:
                    async with session.post(base + "/v1/chat/completions", json=body) as r:
                        await r.read()

                await asyncio.gather(*(one(b) for b in bodies))
                async with session.get(f"http://127.0.0.1:{ports[0]}/arrivals") as response:
                    arrivals = await response.json()
        finally:
            for process in (router, backends):
                process.terminate()
                await asyncio.wait_for(process.wait(), 10)
    return sorted((a - sent) * 1e3 for a in arrivals)


async def _main(args: argparse.Namespace) -> None:
    bodies = _bodies(8)
    settings = [int(p) for p in args.preconnect.split(",")]
    results: dict[int, list[list[float]]] = {p: [] for p in settings}
    for run in range(args.runs):
        for preconnect in settings:
            ms = await _run(preconnect, bodies)
            results[preconnect].append(ms)
            print(f"run {run + 1} preconnect {preconnect}: arrivals ms "
                  + " ".join(f"{x:.1f}" for x in ms), flush=True)
    print()
    print("| preconnect | first arrival ms (median) | median arrival ms (median) | last arrival "
          "ms (median) |")
    print("|---:|---:|---:|---:|")
    for preconnect, runs in results.items():
        first = statistics.median(r[0] for r in runs)
        middle = statistics.median(statistics.median(r) for r in runs)
        last = statistics.median(r[-1] for r in runs)
        print(f"| {preconnect} | {first:.1f} | {middle:.1f} | {last:.1f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "backends":
        asyncio.run(_serve_backends([int(p) for p in sys.argv[2:]]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preconnect", default="0,2", help="settings to compare (0,2)")
    parser.add_argument("--runs", type=int, default=4, help="runs per setting (4)")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
