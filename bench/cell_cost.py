"""What a router costs per request in one regime of ``bench/quality.py``: its CPU (user and
system), its read and write system calls, and its CPU while idle, in front of the same emulated
pods and workload as a quality cell (streamed chat, ~1,450-token prompts, 32 tokens each).

``bench/overhead.py`` measures the request path against a 0 ms backend that answers at once;
here each streamed token reaches the router in its own read, as from an engine, so the relay's
per-chunk cost shows. The routers take turns within a round; ``--rounds`` repeats them.

    .venv/bin/python bench/cell_cost.py                                   # light, 3 routers
    .venv/bin/python bench/cell_cost.py --regime overload --rounds 2 \\
        --routers floor,kvrouter:kv_aware,kvrouter@/tmp/base:kv_aware,sglang-router:cache_aware

Routers: any of ``bench/quality.py``'s, plus ``floor``: ``bench/overhead.py``'s floor (kvrouter's
HTTP server and client relaying round-robin, with no routing, tokenizing, KV events or metrics).
Linux only (``/proc/PID/stat`` and ``/proc/PID/io``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality
from quality_procs import ROOT, Emulator, free_port, make_router
from quality_workload import REGIMES, Regime, build_workload

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts clock ticks


def _usage(pid: int) -> dict[str, float]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = {"user_s": int(stat[11]) * _TICK_S, "sys_s": int(stat[12]) * _TICK_S}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":")
        if key in ("syscr", "syscw"):
            out[key] = float(value)
    return out


class Floor:
    """``bench/overhead.py floor`` in front of the pods."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self.urls: list[str] = []

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self, pods: Emulator, port: int) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bench" / "overhead.py"), "floor", "--port", str(port),
            "--backends", *pods.urls, cwd=ROOT)
        self.urls = [f"http://127.0.0.1:{port}"]
        await asyncio.sleep(2.0)

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()


@contextlib.asynccontextmanager
async def running(name: str, regime: Regime, seed: int, logdir: Path) -> AsyncIterator[Any]:
    """``name`` (``floor`` or any router ``bench/quality.py`` takes) started in front of 4 fresh
    emulated pods shaped by ``regime``; both stopped on the way out, whatever happened."""
    pods = Emulator(count=4, num_gpu_blocks=regime.num_gpu_blocks, slow_pod=regime.slow_pod,
                    log=logdir / "pods.log")
    tag = name.replace(":", "-").replace("/", "_")
    router: Any = Floor() if name == "floor" else make_router(name, logdir / f"{tag}.log", seed)
    await pods.start()
    try:
        await router.start(pods, port=free_port())
        yield router
    finally:
        await router.stop()
        await pods.stop()


async def one(name: str, regime_name: str, seed: int, idle_s: float, logdir: Path) -> dict[str, Any]:
    regime = REGIMES[regime_name]
    async with running(name, regime, seed, logdir) as router:
        pid = router.pid if name == "floor" else router._proc.pid
        before_idle = _usage(pid)
        await asyncio.sleep(idle_s)
        before = _usage(pid)
        items = build_workload(regime, seed)
        start = time.monotonic()
        results, _ = await quality.drive(router.urls, items, regime, 240.0, False)
        run_s = time.monotonic() - start
        after = _usage(pid)
    n = len(results)
    idle_cpu_per_s = ((before["user_s"] + before["sys_s"])
                      - (before_idle["user_s"] + before_idle["sys_s"])) / idle_s
    cpu = (after["user_s"] + after["sys_s"]) - (before["user_s"] + before["sys_s"])
    return {
        "router": name, "requests": n, "errors": sum(not r["ok"] for r in results),
        "run_s": run_s,
        "cpu_ms": cpu / n * 1e3,
        "net_cpu_ms": (cpu - idle_cpu_per_s * run_s) / n * 1e3,
        "user_ms": (after["user_s"] - before["user_s"]) / n * 1e3,
        "sys_ms": (after["sys_s"] - before["sys_s"]) / n * 1e3,
        "reads": (after.get("syscr", 0) - before.get("syscr", 0)) / n,
        "writes": (after.get("syscw", 0) - before.get("syscw", 0)) / n,
        "idle_ms_per_s": idle_cpu_per_s * 1e3,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default="floor,kvrouter:kv_aware,sglang-router:cache_aware")
    parser.add_argument("--regime", default="light", choices=sorted(REGIMES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle-s", type=float, default=2.0)
    args = parser.parse_args()
    logdir = ROOT / ".tools" / "cell-cost"
    logdir.mkdir(parents=True, exist_ok=True)
    names = args.routers.split(",")
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names:
            row = await one(name, args.regime, args.seed, args.idle_s, logdir)
            rows[name].append(row)
            print(f"[round {round_ + 1}] {name}: {row['cpu_ms']:.2f} ms CPU/request "
                  f"(user {row['user_ms']:.2f}, sys {row['sys_ms']:.2f}), "
                  f"{row['reads']:.1f} reads and {row['writes']:.1f} writes/request, "
                  f"errors {row['errors']}", flush=True)
    print(f"\n{args.regime}, seed {args.seed}, {args.rounds} round(s); medians over rounds\n")
    print("| router | CPU ms/request | user | sys | net of idle | reads/request "
          "| writes/request | idle CPU ms/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        def med(key: str, rs: list[dict[str, Any]] = rows[name]) -> float:
            return statistics.median(r[key] for r in rs)
        print(f"| {name} | {med('cpu_ms'):.2f} | {med('user_ms'):.2f} | {med('sys_ms'):.2f} "
              f"| {med('net_cpu_ms'):.2f} | {med('reads'):.1f} | {med('writes'):.1f} "
              f"| {med('idle_ms_per_s'):.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
