"""Router overhead benchmark: requests/s and added latency of kvrouter (and, with --peers,
sglang-router and vllm-router) in front of a 0-latency local backend, versus calling the
backend directly, all in one run.

The load keeps C requests in flight for a few seconds per cell, for C in --concurrency,
non-streaming and streaming; within a cell the targets take turns in short slices so drifting
machine load falls on all of them alike. The load is wrk (`--client wrk`, the default when
installed: C, one thread, ~0.005 ms of CPU per request) or this process's aiohttp client
(`--client python`, ~0.15 ms). The backend (`bench/zero_backend.py`, its own process, one
process listening on --backends ports) answers at once from a bare asyncio protocol: a fixed
JSON completion, or 8 SSE chunks then ``data: [DONE]``; it also answers what the peers probe
at start-up (/health, /get_server_info, /get_model_info, /v1/models, /tokenize, render). The
harness thus leaves the machine's two cores to the routers: with the aiohttp client and an
aiohttp backend it took ~0.27 ms per request, more than a router, and a router's second
process (`serve --workers 2`) had no core to use. Each router runs in its own process with
round_robin over the same backends (kvrouter: `--policy`, e.g. kv_aware), or the policy a
target names after a slash (``sglang-router/cache_aware``).

    .venv/bin/python bench/overhead.py                 # direct vs kvrouter
    .venv/bin/python bench/overhead.py --peers         # + sglang-router, vllm-router (installs
                                                       #   them into .tools/peers-venv first)
    .venv/bin/python bench/overhead.py --kv            # kvrouter kv_aware vs both peers'
                                                       #   cache_aware, one run
    .venv/bin/python bench/overhead.py --policy kv_aware --routers \
        kvrouter-uvloop,kvrouter-uvloop-w2 --concurrency 32 --modes plain
                                                       # serve --workers 1 vs 2 (a -wN suffix)
    ... --prompts unique                               # a different prompt every request
    make native && .venv/bin/python bench/overhead.py --kv --native-ab
                                                       # the compiled request path against
                                                       #   its Python sources, one run

Compare numbers only within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from kvrouter import native

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import wrk_client  # noqa: E402  (bench/ is not a package)

from kvrouter.ports import free_port  # noqa: E402

PEERS_VENV = ROOT / ".tools" / "peers-venv"
MODEL = "tiny"
# kv_aware against the peers' own cache-aware policies (--kv).
KV_TARGETS = ("kvrouter-uvloop/kv_aware", "sglang-router/cache_aware", "vllm-router/cache_aware")


# -- the floor (runs as `overhead.py floor --port P --backends URL ...`) -----------------------

async def _run_floor(port: int, backends: list[str]) -> None:
    """kvrouter's own HTTP server and upstream client with the least a proxy can do between
    them: take the body, pick the next backend, relay the answer. No validation, policy,
    metrics, retries or routing headers: the router's CPU per request minus this is what its
    routing work costs."""
    sys.path.insert(0, str(ROOT))
    from router.http.client import HttpClient
    from router.http.messages import Request, Response, StreamResponse, json_response
    from router.http.server import HttpServer
    from router.http.upstream import forward_headers, response_header_lines

    client = HttpClient(5.0, 60.0, 60.0)
    turn = 0

    async def relay(request: Request) -> Response | StreamResponse:
        nonlocal turn
        turn += 1
        upstream = await client.request(
            backends[turn % len(backends)], request.method, request.raw_path.encode(),
            forward_headers(request.raw_headers, "floor"), await request.read())
        headers = response_header_lines(upstream.raw_headers)
        if upstream.content_type != "text/event-stream":
            body = await upstream.read()
            upstream.release()
            return Response(status=upstream.status, body=body, headers=headers)
        response = StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        await upstream.relay(response.write_nowait, response.drain)
        await response.write_eof()
        upstream.release()
        return response

    async def models(request: Request) -> Response:
        return json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def handle(request: Request) -> Response | StreamResponse:
        return await (models(request) if request.path == "/v1/models" else relay(request))

    server = HttpServer(handle, lambda status, message, request: Response(status=status),
                        max_body_bytes=32 << 20)
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


# -- processes -------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    urls: list[str]  # the client spreads over these (direct: the backends; a router: itself)
    process: subprocess.Popen[bytes] | None = None

    def cpu_s(self) -> float:
        """CPU seconds used so far by the router's process tree (all threads); 0 for direct.
        Unlike latency, this barely moves with the shared machine's load."""
        if self.process is None:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        pids, total = [self.process.pid], 0.0
        while pids:
            pid = pids.pop()
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    pids += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return total


async def _wait_ready(url: str, seconds: float, process: subprocess.Popen[bytes] | None) -> None:
    body = {"model": MODEL, "prompt": "warm up", "max_tokens": 1}
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.post(url + "/v1/completions", json=body) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready in {seconds} s")


def _start(argv: list[str], log_name: str, code_tree: str | None = None,
           python_only: bool = False) -> subprocess.Popen[bytes]:
    log = open(ROOT / ".tools" / f"bench-{log_name}.log", "wb")
    env = None
    if code_tree is not None:  # the same router from another checkout (--baseline-tree)
        env = {**os.environ, "PYTHONPATH": code_tree}
    if python_only:  # the Python sources beside a native build (--native-ab)
        env = {**(env or os.environ), "KVROUTER_NATIVE": "0"}
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def _router_argv(target: str, port: int, backends: list[str], default_policy: str) -> list[str]:
    name, _, policy = target.partition("/")
    policy = policy or (default_policy if name.startswith("kvrouter") else "round_robin")
    if name == "floor":
        return [sys.executable, __file__, "floor", "--port", str(port), "--backends", *backends]
    if name.startswith("kvrouter"):
        # kvrouter-uvloop-w2: `serve --workers 2` (processes sharing the port, synced).
        name, _, workers = name.partition("-w")
        loop = "uvloop" if name.endswith("uvloop") else "asyncio"
        # kv_aware tokenizes every prompt with the project's tiny tokenizer, as served.
        tokenizer = (["--model-tokenizer", f"{MODEL}={ROOT / 'simulator/data/tiny-tokenizer'}"]
                     if policy == "kv_aware" else [])
        return [str(ROOT / ".venv" / "bin" / "kvrouter"), "serve", "--port", str(port),
                "--policy", policy, "--log-level", "warning", "--loop", loop, *tokenizer,
                *(["--workers", workers] if workers else []),
                *[a for b in backends for a in ("--backend", b)]]
    py = str(PEERS_VENV / "bin" / "python")
    metrics_port = str(free_port())  # both crash when their metrics port is taken
    if name == "sglang-router":
        return [py, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                str(port), "--worker-urls", *backends, "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", metrics_port,
                "--log-level", "warn"]
    return [str(PEERS_VENV / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *backends, "--policy", policy, "--prometheus-port",
            metrics_port, "--log-level", "warning"]


@contextlib.asynccontextmanager
async def _targets(args: argparse.Namespace) -> AsyncIterator[list[Target]]:
    (ROOT / ".tools").mkdir(exist_ok=True)
    ports = [free_port() for _ in range(args.backends)]
    backend = _start([sys.executable, str(ROOT / "bench" / "zero_backend.py"), "--ports",
                      *map(str, ports)], "backend")
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    targets = [Target("direct", urls)]
    names = [n for n in args.routers.split(",") if n]
    names += ["sglang-router", "vllm-router"] if args.peers else []
    names += list(KV_TARGETS) if args.kv else []
    if args.baseline_tree:
        names += [f"{n}@base" for n in names if n.startswith("kvrouter")]
    if args.native_ab:
        names += [f"{n}@python" for n in names if n.startswith("kvrouter")]
    try:
        for url in urls:
            await _wait_ready(url, 60, backend)
        for name in names:
            port = free_port()
            python_only = name.endswith("@python")
            code = name.removesuffix("@python")
            code, at_base = code.removesuffix("@base"), code.endswith("@base")
            process = _start(_router_argv(code, port, urls, args.policy),
                             name.replace("/", "-"), args.baseline_tree if at_base else None,
                             python_only)
            targets.append(Target(name, [f"http://127.0.0.1:{port}"], process))
        for target in targets[1:]:
            await _wait_ready(target.urls[0], 120, target.process)
        yield targets
    finally:
        for process in [backend] + [t.process for t in targets if t.process is not None]:
            process.terminate()
        for process in [backend] + [t.process for t in targets if t.process is not None]:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


# -- the closed-loop client ------------------------------------------------------------------

@dataclass
class Cell:
    target: str
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


class Bodies:
    """Request bodies: the same one every time, or (``unique``) the prompt with a number that
    never repeats put in front and after every ~200 characters, so no router can reuse any part
    of an earlier prompt (its tokens, its prefix-tree match, a piece of it) while the other
    words stay the same, as in real traffic."""

    def __init__(self, prompt: str, stream: bool, unique: bool) -> None:
        body = json.dumps({"model": MODEL, "prompt": "\x00", "max_tokens": 16, "stream": stream})
        head, tail = body.split(json.dumps("\x00")[1:-1])
        self._head = head.encode()
        self._tail = tail.encode()
        escaped = json.dumps(prompt)[1:-1].encode()
        self._same = self._head + escaped + self._tail
        cuts = [escaped.find(b" ", i) for i in range(200, len(escaped), 200)]
        bounds = [0, *sorted({c for c in cuts if c > 0}), len(escaped)]
        self._parts = [escaped[a:b] for a, b in itertools.pairwise(bounds)]
        self.unique = unique
        self._n = 0

    def pieces(self) -> tuple[bytes, list[bytes], bytes]:
        """(before the prompt, the prompt's ~200-character pieces, after it)."""
        return self._head, self._parts, self._tail

    def next(self) -> bytes:
        if not self.unique:
            return self._same
        self._n += 1
        number = b" %d" % self._n
        return b"".join([self._head, number[1:], b" ", *(p + number for p in self._parts),
                         self._tail])


async def _slice(session: aiohttp.ClientSession, target: Target, bodies: Bodies,
                 concurrency: int, seconds: float, warmup_s: float
                 ) -> tuple[list[float], int, int]:
    """One closed-loop slice: latencies of the requests that ended in the measured window."""
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors = completed = 0
    measure_from = time.perf_counter() + warmup_s
    end = measure_from + seconds

    async def worker(i: int) -> None:
        nonlocal errors, completed
        n = i
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            url = target.urls[n % len(target.urls)] + "/v1/completions"
            n += 1
            async with session.post(url, data=bodies.next(), headers=headers) as response:
                await response.read()
                status = response.status
            t1 = time.perf_counter()
            completed += 1
            # Every request that ends inside the window counts (for req/s and latency); one
            # that must also start inside it would bias both towards short requests.
            if measure_from <= t1 <= end:
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, errors, completed


def _measure_cell_wrk(targets: list[Target], stream: bool, concurrency: int, seconds: float,
                      warmup_s: float, rounds: int, prompt: str, unique: bool) -> list[Cell]:
    """As ``_measure_cell``, with wrk as the load: each slice is an unmeasured wrk run of
    ``warmup_s`` (at least 1 s) then a measured one, and the router's CPU covers the measured
    run only. A cell's p50 and p99 are the medians of its slices'."""
    head, parts, tail = Bodies(prompt, stream, unique).pieces()
    slice_s = max(1, round(seconds / rounds))
    warm_s = max(1, round(warmup_s))
    offset = 0
    runs: dict[str, list[tuple[wrk_client.WrkSlice, float]]] = {t.name: [] for t in targets}
    for _ in range(rounds):
        for target in targets:
            for measured, duration in ((False, warm_s), (True, slice_s)):
                offset += 10_000_000
                before_s = target.cpu_s()
                result = wrk_client.run_slice(target.urls, concurrency, duration, head, parts,
                                              tail, unique, offset)
                if measured:
                    runs[target.name].append((result, target.cpu_s() - before_s))
    cells = []
    for target in targets:
        done = runs[target.name]
        requests = sum(r.requests for r, _ in done)
        cells.append(Cell(
            target.name, "stream" if stream else "plain", concurrency, requests,
            sum(r.errors for r, _ in done), sum(r.seconds for r, _ in done),
            statistics.median(r.p50_s for r, _ in done) * 1e3,
            statistics.median(r.p99_s for r, _ in done) * 1e3,
            sum(cpu for _, cpu in done) * 1e3 / max(requests, 1)))
    return cells


async def _measure_cell(targets: list[Target], stream: bool, concurrency: int, seconds: float,
                        warmup_s: float, rounds: int, prompt: str, unique: bool) -> list[Cell]:
    """Targets take turns in short slices, ``rounds`` times, so that the machine's drifting
    load (it is shared) falls on all of them alike."""
    bodies = Bodies(prompt, stream, unique)
    results: dict[str, tuple[list[float], list[int]]] = {t.name: ([], []) for t in targets}
    cpu_s = dict.fromkeys((t.name for t in targets), 0.0)
    done = dict.fromkeys((t.name for t in targets), 0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(rounds):
            for target in targets:
                before_s = target.cpu_s()
                latencies, errors, completed = await _slice(
                    session, target, bodies, concurrency, seconds / rounds, warmup_s)
                # CPU covers the whole slice (warm-up and tail too), so divide by every
                # request the slice completed, not only the measured ones.
                cpu_s[target.name] += target.cpu_s() - before_s
                done[target.name] += completed
                results[target.name][0].extend(latencies)
                results[target.name][1].append(errors)
    cells = []
    for target in targets:
        latencies, errors = results[target.name]
        latencies.sort()
        q = (statistics.quantiles(latencies, n=100, method="inclusive")
             if len(latencies) > 1 else [0.0] * 99)
        cells.append(Cell(target.name, "stream" if stream else "plain", concurrency,
                          len(latencies), sum(errors), seconds,
                          statistics.median(latencies) * 1e3 if latencies else 0.0,
                          q[98] * 1e3, cpu_s[target.name] * 1e3 / max(done[target.name], 1)))
    return cells


def _table(cells: list[Cell]) -> str:
    direct = {(c.mode, c.concurrency): c for c in cells if c.target == "direct"}
    lines = ["| target | mode | concurrency | req/s | p50 ms | p99 ms | added p50 ms | "
             "added p99 ms | router CPU ms/request | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        d = direct[(c.mode, c.concurrency)]
        added = ("-", "-") if c.target == "direct" else (
            f"{c.p50_ms - d.p50_ms:+.2f}", f"{c.p99_ms - d.p99_ms:+.2f}")
        lines.append(f"| {c.target} | {c.mode} | {c.concurrency} | {c.rps:,.0f} | "
                     f"{c.p50_ms:.2f} | {c.p99_ms:.2f} | {added[0]} | {added[1]} | "
                     f"{'-' if c.target == 'direct' else f'{c.cpu_ms_per_request:.3f}'} | "
                     f"{c.errors} |")
    return "\n".join(lines)


def _against_sglang(cells: list[Cell]) -> str:
    """Issue 2's throughput target, read off the same run: each kvrouter variant's req/s as a
    share of sglang-router's in the same cell."""
    sglang = [c for c in cells if c.target.startswith("sglang-router")]
    lines = [f"{c.target} / {peer.target} req/s, {c.mode}, concurrency {c.concurrency}: "
             f"{c.rps:,.0f} / {peer.rps:,.0f} = {c.rps / peer.rps:.0%}"
             for c in cells if c.target.startswith("kvrouter") for peer in sglang
             if (peer.mode, peer.concurrency) == (c.mode, c.concurrency) and peer.rps > 0
             and ("/" in c.target) == ("/" in peer.target)]
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    prompt = ("The quick brown fox jumps over the lazy dog. " * 64)[: args.prompt_chars]
    cells: list[Cell] = []
    print(native.describe(), flush=True)  # a stale build runs the sources: say so up front
    async with _targets(args) as targets:
        for stream in [m == "stream" for m in args.modes.split(",")]:
            for concurrency in [int(c) for c in args.concurrency.split(",")]:
                measure = (_measure_cell(targets, stream, concurrency, args.seconds,
                                         args.warmup, args.rounds, prompt,
                                         args.prompts == "unique") if args.client == "python"
                           else asyncio.to_thread(
                               _measure_cell_wrk, targets, stream, concurrency, args.seconds,
                               args.warmup, args.rounds, prompt, args.prompts == "unique"))
                for cell in await measure:
                    cells.append(cell)
                    print(f"  {cell.target:25s} {cell.mode:6s} c={concurrency:<4d} "
                          f"{cell.rps:8.0f} req/s  p50 {cell.p50_ms:6.2f} ms  "
                          f"p99 {cell.p99_ms:6.2f} ms  cpu {cell.cpu_ms_per_request:.3f} ms/req  "
                          f"errors {cell.errors}", flush=True)
    print()
    print(_table(cells))
    targets = _against_sglang(cells)
    if targets:
        print()
        print(targets)
    return cells_ok(cells)


def cells_ok(cells: list[Cell]) -> int:
    return 0 if all(c.errors == 0 and c.requests > 0 for c in cells) else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        parser = argparse.ArgumentParser(prog="overhead.py floor")
        parser.add_argument("floor")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--backends", nargs="+", required=True)
        floor_args = parser.parse_args()
        import uvloop

        uvloop.run(_run_floor(floor_args.port, floor_args.backends))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", action="store_true",
                        help="also run sglang-router and vllm-router (installed on first use)")
    parser.add_argument("--routers", default="kvrouter-asyncio,kvrouter-uvloop",
                        help="kvrouter variants to run (kvrouter-asyncio,kvrouter-uvloop); "
                             "add 'floor' for kvrouter's HTTP server and client relaying with "
                             "no routing work (uvloop), a same-run floor for the router's CPU")
    parser.add_argument("--kv", action="store_true",
                        help="also run " + ", ".join(KV_TARGETS) + " (installs the peers)")
    parser.add_argument("--prompts", choices=("same", "unique"), default="same",
                        help="the same prompt every request, or a unique number before it")
    parser.add_argument("--baseline-tree", default=None, metavar="PATH",
                        help="also run every kvrouter target from the checkout at PATH (named "
                             "...@base), e.g. `git worktree add /tmp/base main`: an A/B in one run")
    parser.add_argument("--native-ab", action="store_true",
                        help="also run every kvrouter target on its Python sources (named "
                             "...@python, KVROUTER_NATIVE=0) beside the native build that "
                             "`make native` made: an A/B in one run")
    parser.add_argument("--policy", default="round_robin",
                        help="kvrouter's policy (round_robin); kv_aware also tokenizes every "
                             "prompt with the tiny tokenizer. The peers always run round_robin")
    parser.add_argument("--concurrency", default="1,32,128", help="comma-separated (1,32,128)")
    parser.add_argument("--modes", default="plain,stream", help="plain and/or stream")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measured seconds per target and cell (3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="slices per cell; targets take turns slice by slice (3)")
    parser.add_argument("--warmup", type=float, default=0.3,
                        help="unmeasured seconds at the start of each slice (0.3)")
    parser.add_argument("--client", choices=("wrk", "python"),
                        default="wrk" if wrk_client.available() else "python",
                        help="the load: wrk (C, one thread; the default when installed) or "
                             "this process's aiohttp client (~0.15 ms more CPU per request on "
                             "the cores the routers use)")
    parser.add_argument("--backends", type=int, default=2, help="backend ports (2)")
    parser.add_argument("--prompt-chars", type=int, default=2000, help="prompt length (2000)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args = parser.parse_args()
    if (args.peers or args.kv) and not (PEERS_VENV / "bin" / "vllm-router").exists():
        subprocess.run([str(ROOT / "bench" / "install-peers")], check=True)
    status = asyncio.run(_main(args))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
