"""Routing quality benchmark: one workload through several routers, each in front of its OWN
fresh set of emulated vLLM pods, in named load regimes (issue 12).

For every (regime, router) cell: start ``kvrouter emulate --count 4`` (H200 Llama-3.1-8B cost
model, real time), start the router in front of those pods, drive the regime's workload from
this process (streamed chat requests), read the pods' own counters before and after, stop both.
Within a regime the routers take turns, so drifting machine load falls on all of them alike.

Figures per cell: pod hit rate (sum over pods of the delta of ``vllm:prefix_cache_hits_total`` /
``vllm:prefix_cache_queries_total``), TTFT p50/p99 at the client (time to the first chunk with
content or a tool call), errors (non-200, a stream without ``[DONE]``, timeouts), imbalance
(max / mean of the requests each pod finished) and preemptions (pods' counters).

    .venv/bin/python bench/quality.py                       # every regime x every router
    .venv/bin/python bench/quality.py --quick               # a quarter of the requests
    .venv/bin/python bench/quality.py --regimes light,pressure \\
        --routers kvrouter:kv_aware,sglang-router:cache_aware --seeds 1,2 --out out/q.json

Routers (``--routers``, comma-separated): ``kvrouter:POLICY`` for any kvrouter policy (default
set: kv_aware in precise mode with the tiny tokenizer and the pods' KV events,
sglang_cache_aware, round_robin), ``sglang-router:cache_aware``, ``vllm-router:cache_aware``
and ``vllm-router:kv_aware`` (KV events from the pods' bound PUB sockets). The peers come from
``bench/install-peers`` (.tools/peers-venv); a peer that is not installed is reported as skipped.
Regimes (``--regimes``): see ``bench/quality_workload.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from kvrouter import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_procs import (
    DEFAULT_ROUTERS,
    ROOT,
    ROUTER_NAMES,
    Emulator,
    add_pin_option,
    free_port,
    make_router,
    pod_counters,
    read_pin_option,
)
from quality_workload import (
    REGIMES,
    Item,
    Regime,
    build_workload,
    imbalance,
    markdown_table,
    misses_table,
    percentile,
    pool_cells,
    verdict_table,
)

REQUEST_TIMEOUT_S = 120.0
CELL_DRAIN_S = 60.0  # after the last open-loop arrival; closed loops get CLOSED_CELL_S in all
CLOSED_CELL_S = 240.0


# -- the client ------------------------------------------------------------------------------

async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               results: list[dict[str, Any]], group: str, trace: bool = False) -> None:
    start = time.monotonic()
    out: dict[str, Any] = {"group": group, "ok": False, "ttft_s": None, "start_s": start}
    # With --trace the pods add a last chunk with their usage (cached tokens included), and
    # the tail kept after the first content is long enough to hold it.
    keep = 4096 if trace else 64
    if trace:
        body = {**body, "stream_options": {"include_usage": True}}
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                out["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            if trace:
                out["backend"] = resp.headers.get("x-kvrouter-backend")
                predicted = resp.headers.get("x-kvrouter-predicted-hit-tokens")
                out["predicted_hit_tokens"] = int(predicted) if predicted else None
            # Parse events only until the first content; after that keep just the tail, enough
            # to see `data: [DONE]` (the client shares the 2 cores with pods and router).
            pending = b""
            async for chunk in resp.content.iter_any():
                pending += chunk
                if out["ttft_s"] is None:
                    *events, rest = pending.split(b"\n\n")
                    if any(_has_content(e) for e in events):
                        out["ttft_s"] = time.monotonic() - start
                        if trace:
                            out["pod"] = _pod_of(events)
                        pending = pending[-keep:]
                    else:
                        pending = rest
                else:
                    pending = pending[-keep:]
            done = pending.rstrip().endswith(b"data: [DONE]")
            out["ok"] = done and out["ttft_s"] is not None
            if not out["ok"]:
                out["error"] = "stream ended without [DONE] or content"
            elif trace:
                out.update(_usage(pending))
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        out["e2e_s"] = time.monotonic() - start
        results.append(out)


def _usage(tail: bytes) -> dict[str, int | None]:
    """The pod's prompt and cached tokens from the stream's usage chunk (None: not found)."""
    for event in reversed(tail.split(b"\n\n")):
        data = event.strip()
        if data.startswith(b"data:") and b'"usage"' in data:
            try:
                usage = json.loads(data[5:]).get("usage") or {}
            except ValueError:
                break
            details = usage.get("prompt_tokens_details") or {}
            return {"prompt_tokens": usage.get("prompt_tokens"),
                    "cached_tokens": details.get("cached_tokens")}
    return {"prompt_tokens": None, "cached_tokens": None}


# The emulator's completion ids are ``chatcmpl-POD-N`` / ``cmpl-POD-N`` (its engine request ids):
# every router relays the body as it is, so the pod that served a request is known for peers too.
_POD_ID = re.compile(rb'"id":\s*"(?:chat)?cmpl-(\d+)-\d+"')


def _pod_of(events: list[bytes]) -> str | None:
    """The emulated pod that answered, from the first event's completion id (None: not an
    emulator's id, e.g. a real vLLM's random one)."""
    for event in events:
        match = _POD_ID.search(event)
        if match:
            return f"pod {int(match.group(1))}"
    return None


def _has_content(event: bytes) -> bool:
    """Does one SSE event carry generated content (text, a content delta or a tool call)?"""
    data = event.strip()
    if not data.startswith(b"data:") or data.endswith(b"[DONE]"):
        return False
    try:
        chunk = json.loads(data[5:])
    except ValueError:
        return False
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("text"):
            return True
    return False


async def drive(target: str | list[str], items: list[Item], regime: Regime,
                limit_s: float, trace: bool = False) -> tuple[list[dict[str, Any]], bool]:
    """Send the workload; returns one result per request and whether the time limit cut it.
    Several targets (router replicas) take the requests in turn. ``trace``: ask the pods for
    their usage chunk and keep, per request, its cached tokens and kvrouter's headers."""
    targets = [target] if isinstance(target, str) else target
    urls = itertools.cycle([f"{t}/v1/chat/completions" for t in targets])
    results: list[dict[str, Any]] = []
    closed = [i for i in items if i.at_s is None and "burst_after" not in i.tags]
    timed = [i for i in items if i.at_s is not None]
    burst = [i for i in items if "burst_after" in i.tags]
    burst_after = int(burst[0].tags["burst_after"]) if burst else -1
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    tasks: list[asyncio.Task[None]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        queue = list(reversed(closed))
        sent = 0

        async def run_item(item: Item) -> None:
            for body in item.bodies:
                await _one(session, next(urls), body, results, item.group, trace)

        async def worker() -> None:
            nonlocal sent
            while queue:
                item = queue.pop()
                sent += 1
                if sent == burst_after:
                    tasks.extend(asyncio.create_task(run_item(b)) for b in burst)
                await run_item(item)

        async def at(item: Item, t0: float) -> None:
            assert item.at_s is not None
            await asyncio.sleep(max(0.0, t0 + item.at_s - time.monotonic()))
            await run_item(item)

        t0 = time.monotonic()
        tasks += [asyncio.create_task(worker()) for _ in range(min(regime.concurrency,
                                                                   len(closed)))]
        tasks += [asyncio.create_task(at(i, t0)) for i in timed]
        cut = False
        try:
            while pending := [t for t in tasks if not t.done()]:
                remaining = t0 + limit_s - time.monotonic()
                if remaining <= 0:
                    cut = True
                    break
                await asyncio.wait(pending, timeout=remaining)
        finally:  # the time limit, or this run being cancelled: stop what is still sending
            left = [t for t in tasks if not t.done()]
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
    expected = sum(len(i.bodies) for i in items)
    for _ in range(expected - len(results)):
        results.append({"group": "?", "ok": False, "ttft_s": None, "error": "not sent: cut"})
    return results, cut


# -- one cell ---------------------------------------------------------------------------------

def _delta_s(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


def _limit_s(regime: Regime, items: list[Item]) -> float:
    last = max((i.at_s or 0.0) for i in items)
    return last + CELL_DRAIN_S if regime.rate_per_s > 0 else CLOSED_CELL_S


async def run_cell(regime: Regime, router_name: str, items: list[Item], args: argparse.Namespace,
                   logdir: Path, seed: int = 1) -> dict[str, Any]:
    cell: dict[str, Any] = {"regime": regime.name, "router": router_name, "seed": seed}
    name = router_name.replace(":", "-").replace("/", "_")
    tag = f"{regime.name}-{name}-seed{seed}"
    emulator = Emulator(count=args.pods, num_gpu_blocks=regime.num_gpu_blocks,
                        slow_pod=regime.slow_pod, log=logdir / f"{tag}-pods.log",
                        cpus=args.pod_cpus)
    router = make_router(router_name, logdir / f"{tag}-router.log", seed, args.router_cpus)
    started = time.monotonic()
    try:
        await emulator.start()
        await router.start(emulator, port=free_port())
        before = await pod_counters(emulator.urls)
        cpu_before = (router.cpu_s(), emulator.cpu_s())
        run_start = time.monotonic()
        results, cut = await drive(router.urls, items, regime, _limit_s(regime, items),
                                   args.trace)
        run_s = time.monotonic() - run_start
        await asyncio.sleep(0.5)  # the last steps' counters
        after = await pod_counters(emulator.urls)
        cpu_after = (router.cpu_s(), emulator.cpu_s())
        parity = await router.token_parity()
    finally:
        await router.stop()
        await emulator.stop()
    delta = [{k: a[k] - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)]
    hits = sum(d["hits"] for d in delta)
    queries = sum(d["queries"] for d in delta)
    ttfts = [r["ttft_s"] for r in results if r["ok"]]
    errors = [r for r in results if not r["ok"]]
    cell.update({
        "requests": len(results),
        "hit_rate": hits / queries if queries else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "errors": len(errors),
        "error_samples": sorted({e.get("error", "?") for e in errors})[:5],
        "imbalance": imbalance([d["requests"] for d in delta]),
        "preemptions": int(sum(d["preemptions"] for d in delta)),
        "per_pod": delta,
        "token_parity": parity,
        # CPU the router and the pods' process used during the run: the router, the pods and
        # this client share the machine's cores, which bounds the open-loop regimes.
        "router_cpu_s": _delta_s(cpu_before[0], cpu_after[0]),
        "pods_cpu_s": _delta_s(cpu_before[1], cpu_after[1]),
        "cut_by_time_limit": cut,
        "run_s": round(run_s, 2),
        "cell_s": round(time.monotonic() - started, 2),
        "throughput_req_s": round(len(ttfts) / run_s, 2) if run_s else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "ttft_s": [round(t, 4) for t in ttfts],
    })
    if args.trace:
        cell["trace"] = _trace_rows(results, run_start)
    return cell


def _trace_rows(results: list[dict[str, Any]], run_start: float) -> list[dict[str, Any]]:
    """``--trace``: one row per answered request in the order it was sent: when (s after the
    run began), its group, TTFT, the pod that answered (from the emulator's completion id,
    whatever the router), the pod's prompt and cached tokens and, through kvrouter, the
    backend it chose and the hit tokens it predicted."""
    rows = []
    for r in sorted((r for r in results if r["ok"]), key=lambda r: r["start_s"]):
        rows.append({"start_s": round(r["start_s"] - run_start, 4), "group": r["group"],
                     "ttft_s": round(r["ttft_s"], 4), "pod": r.get("pod"),
                     "backend": r.get("backend"),
                     "predicted_hit_tokens": r.get("predicted_hit_tokens"),
                     "prompt_tokens": r.get("prompt_tokens"),
                     "cached_tokens": r.get("cached_tokens")})
    return rows


# -- main -------------------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", default=",".join(DEFAULT_ROUTERS),
                   help=f"comma-separated routers (default: all): {', '.join(ROUTER_NAMES)}; "
                        "kvrouter:POLICY takes any kvrouter policy (kvrouter:POLICY+NAME=VALUE+... "
                        "sets its parameters; kvrouter@PATH:POLICY runs the checkout at PATH, "
                        "e.g. a `git worktree` of the tree before a change); kvrouterxR:POLICY runs R "
                        "synced replicas (kvrouterxR-nosync:POLICY without sync), the client "
                        "alternating between them")
    p.add_argument("--regimes", default=",".join(REGIMES),
                   help=f"comma-separated regimes (default: all): {', '.join(REGIMES)}")
    p.add_argument("--seeds", default="1",
                   help="comma-separated workload seeds (default 1); with several, every cell "
                        "runs once per seed and the tables pool them (hits over queries, all "
                        "TTFTs), which steadies p99")
    p.add_argument("--quick", action="store_true",
                   help="a quarter of the groups/sessions (at least 4): a smoke run")
    p.add_argument("--pods", type=int, default=4, help="emulated pods per router (default 4)")
    p.add_argument("--budget-min", type=float, default=90.0,
                   help="stop starting new cells after this many minutes (default 90); "
                        "cells not run are listed as skipped")
    add_pin_option(p)
    p.add_argument("--trace", action="store_true",
                   help="per request, record the pod's cached tokens (the stream's usage "
                        "chunk, asked with stream_options.include_usage) and, through "
                        "kvrouter, the backend chosen and the hit tokens predicted: the "
                        "cells' \"trace\" in --out")
    p.add_argument("--control", action="store_true",
                   help="also run this checkout's kvrouter:kv_aware a second time, as "
                        "kvrouter@THIS_CHECKOUT:kv_aware, interleaved with the others: the "
                        "verdict then labels each gap within or beyond the two identical "
                        "routers' own gap in that regime (the run's noise floor)")
    p.add_argument("--out", default=None, help="write the raw figures as JSON to this file")
    p.add_argument("--logs", default=None,
                   help="directory for the pods' and routers' logs (default: a temp dir)")
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seed_list:
        p.error("--seeds: give at least one seed")
    args.router_list = [r for r in args.routers.split(",") if r]
    args.regime_list = [r for r in args.regimes.split(",") if r]
    for r in args.regime_list:
        if r not in REGIMES:
            p.error(f"--regimes: unknown regime {r!r}; known: {', '.join(REGIMES)}")
    for r in args.router_list:
        if r not in ROUTER_NAMES and not r.startswith(("kvrouter:", "kvrouterx", "kvrouter@")):
            p.error(f"--routers: unknown router {r!r}; known: {', '.join(ROUTER_NAMES)}")
    args.control_name = f"kvrouter@{ROOT}:kv_aware" if args.control else None
    if args.control_name and args.control_name not in args.router_list:
        args.router_list.append(args.control_name)
    read_pin_option(p, args)
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM cancels like Ctrl-C does, so the running cell still stops its pods and router.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if args.router_cpus is not None:
        os.sched_setaffinity(0, args.router_cpus)  # the client shares the routers' CPUs
    logdir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="kvq-"))
    logdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_min * 60
    cells: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seeds": args.seed_list, "quick": args.quick, "pods": args.pods,
        "pinned": None if not args.pin else {"pods": sorted(args.pod_cpus),
                                             "routers_and_client": sorted(args.router_cpus)},
        "load_average_start": os.getloadavg(), "logs": str(logdir), "cells": cells,
    }
    expected_s = sum(REGIMES[r].expected_cell_s for r in args.regime_list)
    expected_s *= len(args.router_list) * len(args.seed_list) * (0.4 if args.quick else 1.0)
    print(f"{len(args.regime_list)} regimes x {len(args.router_list)} routers x "
          f"{len(args.seed_list)} seeds: about "
          f"{expected_s / 60:.0f} min on an idle machine (budget {args.budget_min:g} min); "
          f"{native.describe()}", file=sys.stderr, flush=True)
    plan = [(REGIMES[r], seed) for r in args.regime_list for seed in args.seed_list]
    for regime, seed in plan:
        items = build_workload(regime, seed, quick=args.quick)
        for router_name in args.router_list:
            if time.monotonic() >= deadline:
                cells.append({"regime": regime.name, "router": router_name, "seed": seed,
                              "skipped": "time budget"})
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {regime.name} / {router_name} / seed {seed} "
                  f"({sum(len(i.bodies) for i in items)} requests, load "
                  f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            for attempt in (1, 2):  # a second try for a port taken by someone else meanwhile
                try:
                    cell = await run_cell(regime, router_name, items, args, logdir, seed)
                    break
                except Exception as exc:  # one broken router must not lose the other cells
                    cell = {"regime": regime.name, "router": router_name, "seed": seed,
                            "skipped": f"{type(exc).__name__}: {exc}"[:300]}
                    print(f"    attempt {attempt} failed: {cell['skipped']}", file=sys.stderr,
                          flush=True)
            cells.append(cell)
            if args.out:  # after every cell, so an interrupted run keeps what it measured
                _write(Path(args.out), report)
            if "skipped" not in cell:
                parity = cell["token_parity"]
                mismatch = "" if parity is None else (
                    f", token parity {parity['mismatched_blocks']:.0f} mismatched of "
                    f"{parity['checked_blocks']:.0f} blocks")
                print(f"    hit {cell['hit_rate']}, p50 {cell['ttft_p50_s']}, "
                      f"p99 {cell['ttft_p99_s']}, errors {cell['errors']}, "
                      f"{cell['cell_s']} s{mismatch}", file=sys.stderr, flush=True)
            else:
                print(f"    skipped: {cell['skipped']}", file=sys.stderr, flush=True)
    report["load_average_end"] = os.getloadavg()
    return report


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.monotonic()
    try:
        report = asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; the cells measured so far are in --out", file=sys.stderr)
        return 130
    report["total_s"] = round(time.monotonic() - started, 1)
    report["pooled"] = pool_cells(report["cells"])
    print(markdown_table(report["pooled"]))
    print()
    print(verdict_table(report["pooled"], control=args.control_name,
                        per_seed=report["cells"]))
    misses = misses_table(report["cells"]) if args.trace else ""
    if misses:
        print("\nWhere the misses came from (requests; bench/quality_workload.py miss_kinds):")
        print(misses)
    print(f"\n{report['date_utc']} UTC, {report['total_s']} s, load average "
          f"{report['load_average_start'][0]:.1f} -> {report['load_average_end'][0]:.1f}, "
          f"seeds {args.seeds}{', quick' if args.quick else ''}")
    if args.out:
        _write(Path(args.out), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
