"""What a router adds to one request's time to first token, with nothing queued: cold and warm.

``bench/quality.py``'s tie regimes (light, agentic) are decided by a few milliseconds of p99,
where queueing and machine noise move every router. Here each router, in front of its own
fresh emulated pods (the light regime's: default KV, 16-token blocks), gets the first request
of each of ``--groups`` groups (a new ~1,400-token system prompt: *cold*), then that group's
second request (the same prefix, a new question: *warm*), one at a time with ``--gap-s``
between them, streamed like a quality cell. The median TTFT per kind is the pods' modelled
prefill plus what the router adds; ``floor`` (``bench/overhead.py``'s bare relay, round robin)
is the reference, so ``router - floor`` is the router's own share. Round robin sends a warm
request anywhere: compare warm figures only between cache-aware routers.

    .venv/bin/python bench/added_ttft.py                     # floor, kv_aware, sglang-router
    .venv/bin/python bench/added_ttft.py --rounds 3 --routers floor,kvrouter:kv_aware,\\
        kvrouter:round_robin,sglang-router:cache_aware,vllm-router:cache_aware
    .venv/bin/python bench/added_ttft.py --strace --routers kvrouter:kv_aware   # where it goes

``--strace`` (kvrouter only; needs ``strace``) follows the router's reads and writes and splits
each request into *route* (the client's request read to the upstream request written: parsing,
tokenizing, hashing, the decision), *pod* (to the first streamed event read back) and *relay*
(to its write to the client). strace slows system calls, not the code between them.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality
from cell_cost import running
from quality_procs import ROOT
from quality_workload import REGIMES, build_workload


def pairs(seed: int, groups: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, first request, second request) for the first ``groups`` groups of the light
    regime's workload: the first is the group's cold prompt, the second shares its prefix."""
    first: dict[str, dict[str, Any]] = {}
    second: dict[str, dict[str, Any]] = {}
    for item in build_workload(REGIMES["light"], seed):
        (body,) = item.bodies
        (second if item.group in first else first).setdefault(item.group, body)
    return [(g, first[g], second[g]) for g in list(first)[:groups] if g in second]


async def one(name: str, seed: int, groups: int, gap_s: float, logdir: Path,
              strace: bool) -> dict[str, Any]:
    tag = name.replace(":", "-").replace("/", "_")
    tracer: asyncio.subprocess.Process | None = None
    trace_file = logdir / f"{tag}.strace"
    ttft: dict[str, list[float]] = {"cold": [], "warm": []}
    errors = 0
    async with running(name, REGIMES["light"], seed, logdir) as router:
        try:
            if strace and name.startswith("kvrouter"):
                tracer = await asyncio.create_subprocess_exec(
                    "strace", "-f", "-p", str(router._proc.pid), "-ttt", "-s", "48",
                    "-e", "trace=read,write,recvfrom,sendto,writev", "-o", str(trace_file),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                await asyncio.sleep(1.0)  # attached to every thread
            url = router.urls[0] + "/v1/chat/completions"
            async with aiohttp.ClientSession() as session:
                for group, cold, warm in pairs(seed, groups):
                    for kind, body in (("cold", cold), ("warm", warm)):
                        out: list[dict[str, Any]] = []
                        await quality._one(session, url, body, out, group)
                        if out[0]["ok"]:
                            ttft[kind].append(out[0]["ttft_s"])
                        else:
                            errors += 1
                        await asyncio.sleep(gap_s)
        finally:
            if tracer is not None:
                tracer.terminate()
                await tracer.wait()
    row: dict[str, Any] = {"router": name, "errors": errors}
    for kind, values in ttft.items():
        row[f"{kind}_ms"] = statistics.median(values) * 1e3 if values else float("nan")
    if tracer is not None:
        row.update(split_trace(trace_file.read_text()))
    return row


_CALL = re.compile(r'\d+\s+(\d+\.\d+) (\w+)\((\d+), "(.*?)"')


def split_trace(text: str) -> dict[str, float]:
    """Median route, pod and relay milliseconds per kind from an strace of the router: the
    requests alternate cold and warm, in the order sent."""
    calls = [(float(m[1]), m[2], int(m[3]), m[4]) for m in map(_CALL.match, text.splitlines())
             if m]
    spans: list[tuple[float, float, float]] = []
    for i, (t0, op, client, data) in enumerate(calls):
        if op not in ("read", "recvfrom") or not data.startswith("POST "):
            continue
        sent = first = upstream = None
        for t, op2, fd, data2 in calls[i + 1:]:
            if sent is None:
                if op2 in ("write", "writev", "sendto") and data2.startswith("POST "):
                    sent, upstream = t, fd
            elif first is None:
                if fd == upstream and op2 in ("read", "recvfrom") and "data:" in data2:
                    first = t
            elif fd == client and op2 in ("write", "writev", "sendto"):
                spans.append((sent - t0, first - sent, t - first))
                break
    out: dict[str, float] = {}
    for k, kind in enumerate(("cold", "warm")):
        mine = spans[k::2]
        for j, part in enumerate(("route", "pod", "relay")):
            if mine:
                out[f"{kind}_{part}_ms"] = statistics.median(s[j] for s in mine) * 1e3
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--routers", default="floor,kvrouter:kv_aware,sglang-router:cache_aware")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--groups", type=int, default=40, help="cold and warm requests each")
    p.add_argument("--gap-s", type=float, default=0.05, help="idle time between requests")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--strace", action="store_true")
    args = p.parse_args()
    if args.strace and shutil.which("strace") is None:
        p.error("--strace: strace is not installed")
    logdir = ROOT / ".tools" / "added-ttft"
    logdir.mkdir(parents=True, exist_ok=True)
    names = args.routers.split(",")
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names:  # routers take turns, so drift hits each alike
            row = await one(name, args.seed, args.groups, args.gap_s, logdir, args.strace)
            rows[name].append(row)
            print(f"[round {round_ + 1}] {name}: cold {row['cold_ms']:.2f} ms, warm "
                  f"{row['warm_ms']:.2f} ms, errors {row['errors']}", flush=True)

    def med(name: str, key: str) -> float:
        values = [r[key] for r in rows[name] if key in r]
        return statistics.median(values) if values else float("nan")

    floor = {k: med("floor", f"{k}_ms") for k in ("cold", "warm")} if "floor" in rows else None
    print(f"\nseed {args.seed}, {args.groups} groups, {args.rounds} round(s); medians over "
          "rounds of each run's median TTFT\n")
    print("| router | cold TTFT ms | warm TTFT ms | cold - floor | warm - floor |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        cold, warm = med(name, "cold_ms"), med(name, "warm_ms")
        extra = (f"{cold - floor['cold']:+.2f} | {warm - floor['warm']:+.2f}" if floor
                 else "- | -")
        print(f"| {name} | {cold:.2f} | {warm:.2f} | {extra} |")
    if args.strace:
        print("\n| router | kind | route ms | pod ms | relay ms |\n|---|---|---:|---:|---:|")
        for name in names:
            for kind in ("cold", "warm"):
                if f"{kind}_route_ms" in rows[name][0]:
                    print(f"| {name} | {kind} | {med(name, f'{kind}_route_ms'):.3f} "
                          f"| {med(name, f'{kind}_pod_ms'):.2f} "
                          f"| {med(name, f'{kind}_relay_ms'):.3f} |")


if __name__ == "__main__":
    asyncio.run(main())
