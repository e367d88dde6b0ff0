"""Chaos benchmark: a router (its own process) under attack and failures, on 127.0.0.1 only.

Scenarios (``--scenarios``, comma-separated; all by default), each bounded in time:

- ``kill``: two backends (processes of this script: OpenAI-shaped answers, streams of 8
  chunks 20 ms apart, every request id they receive appended to a log unbuffered) under a
  closed-loop load; one backend is killed with SIGKILL, mid-stream for some requests, and
  restarted on its port. Non-streaming and streaming. Reports unanswered requests (no HTTP
  answer at all), router-made 5xx, streams cut short, requests a backend received more than
  once (only retries before the first byte are allowed: a duplicate is a cut stream whose id
  a backend received again), and seconds from the restart until the router sends the
  backend traffic again. ``rejoin`` (not in the default set): the same with the default
  health settings (checks every 5 s, 30 s ejection) and 40 s after the restart.
- ``restart``: two emulated vLLM pods (``kvrouter emulate``, KV events with replay) and a
  kv_aware router; after traffic with 4 shared prefixes the router is restarted: seconds
  until ``/debug/route`` predicts the same hit tokens as before.
- ``stall``: 10 clients send a head with Content-Length 31 MiB and 30 MiB of body, then
  nothing; 20 more trickle a head one byte a second (slowloris). Meanwhile normal clients
  keep requesting: their p99, the router's RSS (baseline, peak, after), and how the
  attackers were answered.
- ``events``: the router binds its KV-event socket; a stranger on 127.0.0.2 forges a
  restart and 200,000 stored blocks, and a backend's own address (127.0.0.1) sends garbage.
  Reports refused connections, index entries, malformed messages and RSS.
- ``fuzz``: the hypothesis property of ``tests/test_fuzz_http.py`` with many more examples,
  against the router process: router-made 5xx and answers without ``x-request-id``.
- ``soak``: ``--soak-s`` seconds of closed-loop load, the router's RSS sampled every 10 s.

    .venv/bin/python bench/chaos.py [--scenarios kill,restart,stall,events,fuzz,soak]
                                    [--soak-s 600] [--fuzz-examples 3000]

Figures go to bench/README.md. Compare within one run; the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvrouter.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llama"
TOKENIZER = ROOT / "simulator" / "data" / "tiny-tokenizer"
_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# ---- processes ------------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _start_backend(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "backend", "--port", str(port),
                             "--log", str(log_path)], env=_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _start_emulator(count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from kvrouter.cli import main; sys.exit(main())",
         "emulate", "--count", str(count), "--port", "0", "--time-scale", "100", "--model",
         MODEL, "--tokenizer", str(TOKENIZER)], env=_ENV, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)


def _start_router(config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    path = workdir / f"router-{port}.json"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = open(workdir / f"router-{port}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kvrouter.cli import main; sys.exit(main())",
         "serve", "--config", str(path), "--port", str(port), "--log-level", "warning"],
        env=_ENV, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


async def _wait_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


# ---- the backend process ------------------------------------------------------------------

def _backend_main(port: int, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        os.write(fd, request.headers.get("x-request-id", "-").encode() + b"\n")
        stream = b'"stream": true' in body
        if not stream:
            await asyncio.sleep(0.02)
            return web.json_response({"id": "cmpl", "object": "text_completion", "choices": [
                {"index": 0, "text": "ok", "finish_reason": "stop"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(8):
            await asyncio.sleep(0.02)
            await response.write(b'data: {"choices": [{"index": 0, "text": "%d"}]}\n\n' % i)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "root": MODEL, "max_model_len": 4096}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/{tail:.*}", generate)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ---- load -----------------------------------------------------------------------------------

@dataclass
class Load:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    router_5xx: int = 0
    unanswered: int = 0
    cut_streams: int = 0
    cut_ids: list[str] = field(default_factory=list)
    by_backend: list[tuple[float, str]] = field(default_factory=list)
    ids: int = 0


async def _closed_loop(url: str, concurrency: int, seconds: float, *, stream: bool,
                       prefix: str, load: Load) -> None:
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=30)

    async def client(c: int) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                load.ids += 1
                rid = f"{prefix}-{c}-{n}"
                body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 8,
                        "stream": stream}
                started = time.monotonic()
                try:
                    async with session.post(url + "/v1/completions", json=body,
                                            headers={"x-request-id": rid}) as response:
                        data = await response.read()
                        backend = response.headers.get("x-kvrouter-backend")
                        load.statuses[response.status] = load.statuses.get(response.status,
                                                                           0) + 1
                        if response.status >= 500 and backend is None:
                            load.router_5xx += 1
                        if stream and response.status == 200 and b"[DONE]" not in data:
                            load.cut_streams += 1
                            load.cut_ids.append(rid)
                        if backend:
                            load.by_backend.append((time.monotonic(), backend))
                except (aiohttp.ClientError, TimeoutError):
                    load.unanswered += 1
                    continue
                load.latencies_s.append(time.monotonic() - started)

    await asyncio.gather(*(client(c) for c in range(concurrency)))


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- scenarios ------------------------------------------------------------------------------

async def scenario_kill(workdir: Path, stream: bool, *, concurrency: int = 16,
                        after_restart_s: float = 8.0, fast_health: bool = True) -> dict[str, Any]:
    ports = [free_port(), free_port()]
    logs = [workdir / f"backend-{p}.log" for p in ports]
    backends = [_start_backend(p, log) for p, log in zip(ports, logs, strict=True)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    router, url = _start_router({
        "backends": urls, "policy": {"name": "round_robin"},
        "health": {"interval_s": 1.0, "timeout_s": 0.5} if fast_health else {},
        "retries": {"max_attempts": 3},
    }, workdir)
    try:
        for u in [*urls, url]:
            await _wait_http(u)
        load = Load()
        run = asyncio.create_task(_closed_loop(url, concurrency, 8 + after_restart_s,
                                               stream=stream,
                                               prefix=f"kill-{int(stream)}", load=load))
        await asyncio.sleep(4)
        backends[0].send_signal(signal.SIGKILL)  # mid-request and mid-stream for some
        backends[0].wait()
        await asyncio.sleep(4)
        restarted_at = time.monotonic()
        backends[0] = _start_backend(ports[0], logs[0])
        await run
        rejoin = [t for t, b in load.by_backend if b == urls[0] and t > restarted_at]
        seen: dict[str, int] = {}
        for log in logs:
            for line in log.read_text().splitlines():
                seen[line] = seen.get(line, 0) + 1
        return {
            "requests": load.ids, "answered": sum(load.statuses.values()),
            "unanswered": load.unanswered, "router_5xx": load.router_5xx,
            "statuses": load.statuses, "cut_streams": load.cut_streams,
            # Received by both backends: the first died before answering, the router retried.
            "retried_before_first_byte": sum(1 for n in seen.values() if n > 1),
            # Sent again after the client had bytes of an answer: never allowed.
            "duplicates_after_first_byte": sum(1 for i in load.cut_ids if seen.get(i, 0) > 1),
            "rejoin_s": round(rejoin[0] - restarted_at, 2) if rejoin else None,
            "p99_ms": round(_p(load.latencies_s, 0.99) * 1e3, 1),
        }
    finally:
        for process in [*backends, router]:
            _stop(process)


async def _stall_client(port: int, results: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                 % (31 << 20))
    chunk = b"a" * (1 << 20)
    try:
        for _ in range(30):
            writer.write(chunk)
            await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 60)
        results.append(line.split(b" ")[1].decode() if line else "closed")
    except (ConnectionError, TimeoutError) as exc:
        results.append(type(exc).__name__)
    finally:
        writer.close()


async def _slowloris(port: int, seconds: float, results: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
    deadline = time.monotonic() + seconds
    try:
        for byte in head:
            if time.monotonic() > deadline:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1.0)
            if reader.at_eof():
                break
        data = await asyncio.wait_for(reader.read(), 5)
        results.append("closed" if not data else data.split(b" ")[1].decode())
    except (ConnectionError, TimeoutError) as exc:
        results.append(type(exc).__name__)
    finally:
        writer.close()


async def scenario_stall(workdir: Path) -> dict[str, Any]:
    port = free_port()
    backend = _start_backend(port, workdir / f"backend-{port}.log")
    router, url = _start_router({"backends": [f"http://127.0.0.1:{port}"],
                                 "server": {"body_timeout_s": 5.0}}, workdir)
    router_port = int(url.rsplit(":", 1)[1])
    try:
        await _wait_http(f"http://127.0.0.1:{port}")
        await _wait_http(url)
        calm = Load()
        await _closed_loop(url, 8, 4, stream=False, prefix="calm", load=calm)
        baseline_mb = _rss_mb(router.pid)
        rss: list[float] = []

        async def sample() -> None:
            while True:
                rss.append(_rss_mb(router.pid))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        stalled: list[str] = []
        slow: list[str] = []
        attack = [asyncio.create_task(_stall_client(router_port, stalled)) for _ in range(10)]
        attack += [asyncio.create_task(_slowloris(router_port, 100, slow)) for _ in range(20)]
        under = Load()
        await _closed_loop(url, 8, 12, stream=False, prefix="under", load=under)
        await asyncio.wait_for(asyncio.gather(*attack), 120)
        await asyncio.sleep(3)
        sampler.cancel()
        after_mb = _rss_mb(router.pid)
        return {
            "baseline_rss_mb": round(baseline_mb, 1), "peak_rss_mb": round(max(rss), 1),
            "after_rss_mb": round(after_mb, 1),
            "stalled_answers": sorted(stalled), "slowloris_answers": sorted(set(slow)),
            "calm_p99_ms": round(_p(calm.latencies_s, 0.99) * 1e3, 1),
            "under_attack_p99_ms": round(_p(under.latencies_s, 0.99) * 1e3, 1),
            "under_attack_unanswered": under.unanswered, "router_5xx": under.router_5xx,
        }
    finally:
        _stop(router)
        _stop(backend)


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def scenario_events(workdir: Path) -> dict[str, Any]:
    import msgpack
    import zmq
    import zmq.asyncio

    port, event_port = free_port(), free_port()
    backend = _start_backend(port, workdir / f"backend-{port}.log")
    burl = f"http://127.0.0.1:{port}"
    bind = f"tcp://127.0.0.1:{event_port}"
    router, url = _start_router({
        "backends": [burl], "policy": {"name": "kv_aware"},
        "models": {MODEL: {"tokenizer": str(TOKENIZER), "block_size": 16}},
        "kv_events": {"bind": bind, "discover": False, "replay": False, "scrape": False,
                      "sources": [{"backend": burl, "endpoint": bind, "topic": ""}]},
    }, workdir)
    ctx = zmq.asyncio.Context()
    try:
        await _wait_http(burl)
        await _wait_http(url)
        await asyncio.sleep(1)
        baseline_mb = _rss_mb(router.pid)
        forger = ctx.socket(zmq.PUB)
        forger.setsockopt(zmq.SNDHWM, 0)
        forger.connect(f"tcp://127.0.0.2:0;127.0.0.1:{event_port}")
        garbage = ctx.socket(zmq.PUB)  # from a backend's own address: let in, then decoded
        garbage.connect(bind)
        await asyncio.sleep(1)
        started = time.monotonic()
        forger.send_multipart([b"", (0).to_bytes(8, "big"),
                               msgpack.packb([time.time() + 1e6, [], 0])])
        for seq in range(2000):  # 200,000 forged blocks
            events = [{"type": "BlockStored", "block_hashes": [seq * 100 + i],
                       "parent_block_hash": None, "token_ids": [seq * 100 + i] * 16,
                       "block_size": 16, "lora_id": None, "medium": "GPU"}
                      for i in range(100)]
            forger.send_multipart([b"", (seq + 1).to_bytes(8, "big"),
                                   msgpack.packb([time.time(), events, 0])])
            garbage.send_multipart([b"", os.urandom(8), os.urandom(64)])
            if seq % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(3)
        return {
            "seconds_sending": round(time.monotonic() - started, 1),
            "refused_connections": await _metric(
                url, "kvrouter_kv_event_connections_refused_total"),
            "index_entries": await _metric(url, "kvrouter_index_entries"),
            "malformed_counted": await _metric(url, "kvrouter_kv_events_malformed_total"),
            "engine_restarts_seen": await _metric(url,
                                                  "kvrouter_kv_event_engine_restarts_total"),
            "baseline_rss_mb": round(baseline_mb, 1),
            "after_rss_mb": round(_rss_mb(router.pid), 1),
        }
    finally:
        ctx.destroy(linger=0)
        _stop(router)
        _stop(backend)


async def scenario_fuzz(workdir: Path, examples: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fuzz_http as fuzz
    from hypothesis import HealthCheck, given, settings

    port = free_port()
    backend = _start_backend(port, workdir / f"backend-{port}.log")
    router, url = _start_router({
        "backends": [f"http://127.0.0.1:{port}"], "policy": {"name": "kv_aware"},
        "models": {MODEL: {"tokenizer": str(TOKENIZER), "block_size": 4}},
        "kv_events": {"discover": False, "scrape": False},
    }, workdir)
    router_port = int(url.rsplit(":", 1)[1])
    counts = {"examples": 0, "router_5xx": 0, "no_request_id": 0, "not_openai_json": 0}
    fuzz.MODEL = MODEL
    try:
        await _wait_http(f"http://127.0.0.1:{port}")
        await _wait_http(url)

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(method=fuzz._method, path=fuzz._path,
               headers=fuzz.st.lists(fuzz._header, max_size=6), body=fuzz._body)
        def prop(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> None:
            if method in ("GET", "HEAD") and path != "/v1/completions":
                body = b""
            status, got, data = fuzz._request(router_port, method, path, headers, body)
            counts["examples"] += 1
            router_made = "x-kvrouter-backend" not in got
            counts["router_5xx"] += router_made and status >= 500
            counts["no_request_id"] += not got.get("x-request-id")
            if router_made and status >= 400 and method != "HEAD":
                try:
                    error = json.loads(data)["error"]
                    ok = set(error) == {"message", "type", "param", "code"}
                except (ValueError, KeyError, TypeError):
                    ok = False
                counts["not_openai_json"] += not ok

        started = time.monotonic()
        await asyncio.to_thread(prop)
        counts["seconds"] = round(time.monotonic() - started, 1)
        log_text = await asyncio.to_thread((workdir / f"router-{router_port}.log").read_text)
        counts["router_log_tracebacks"] = log_text.count("Traceback")
        return counts
    finally:
        _stop(router)
        _stop(backend)


async def _predicted_hits(url: str, prompts: list[str]) -> int:
    total = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for prompt in prompts:
            body = {"model": MODEL, "max_tokens": 4, "messages": [
                {"role": "system", "content": prompt}, {"role": "user", "content": "again?"}]}
            async with session.post(url + "/debug/route", json=body) as response:
                if response.status != 200:
                    return -1
                total += (await response.json())["decision"]["predicted_hit_tokens"]
    return total


async def scenario_restart(workdir: Path) -> dict[str, Any]:
    emulator = _start_emulator(2)
    assert emulator.stdout is not None
    urls: list[str] = []
    while len(urls) < 2:
        line = (await asyncio.to_thread(emulator.stdout.readline)).decode()
        if not line:
            raise RuntimeError("the emulator exited")
        if line.startswith("pod "):
            urls.append(line.split()[2])
    config = {"backends": urls, "policy": {"name": "kv_aware"},
              "models": {MODEL: {"tokenizer": str(TOKENIZER), "block_size": 16}},
              "kv_events": {"discover_interval_s": 0.5}}
    router, url = _start_router(config, workdir)
    words = "cache block router prefix engine token decode prefill tenant session".split()
    prompts = [f"You are assistant {g}. " + " ".join(words[(g + i) % 10] for i in range(400))
               for g in range(4)]
    try:
        await _wait_http(url)
        await asyncio.sleep(2)  # event sources discovered and subscribed
        async with aiohttp.ClientSession() as session:
            for i in range(16):
                body = {"model": MODEL, "max_tokens": 4, "messages": [
                    {"role": "system", "content": prompts[i % 4]},
                    {"role": "user", "content": f"question {i}"}]}
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    await response.read()
        await asyncio.sleep(1)
        before = await _predicted_hits(url, prompts)
        _stop(router)
        started = time.monotonic()
        router, url = _start_router(config, workdir)
        await _wait_http(url)
        serving_s = time.monotonic() - started
        after = -1
        while time.monotonic() - started < 60:
            after = await _predicted_hits(url, prompts)
            if after >= before:
                break
            await asyncio.sleep(0.2)
        return {"predicted_hit_tokens_before": before, "after": after,
                "seconds_to_serve": round(serving_s, 2),
                "seconds_to_same_predictions": round(time.monotonic() - started, 2)
                if after >= before else None}
    finally:
        _stop(router)
        _stop(emulator)


async def scenario_soak(workdir: Path, seconds: float) -> dict[str, Any]:
    port = free_port()
    backend = _start_backend(port, workdir / f"backend-{port}.log")
    router, url = _start_router({"backends": [f"http://127.0.0.1:{port}"]}, workdir)
    try:
        await _wait_http(f"http://127.0.0.1:{port}")
        await _wait_http(url)
        samples: list[float] = []

        async def sample() -> None:
            while True:
                samples.append(round(_rss_mb(router.pid), 1))
                await asyncio.sleep(10)

        sampler = asyncio.create_task(sample())
        load = Load()
        await _closed_loop(url, 4, seconds, stream=False, prefix="soak", load=load)
        sampler.cancel()
        half = samples[len(samples) // 2:]
        return {"seconds": seconds, "requests": load.ids, "unanswered": load.unanswered,
                "router_5xx": load.router_5xx, "rss_mb_every_10s": samples,
                "second_half_rss_spread_mb": round(max(half) - min(half), 1) if half else None,
                "p99_ms": round(_p(load.latencies_s, 0.99) * 1e3, 1),
                "median_ms": round(statistics.median(load.latencies_s) * 1e3, 1)}
    finally:
        _stop(router)
        _stop(backend)


async def main(args: argparse.Namespace) -> None:
    scenarios = args.scenarios.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvrouter-chaos-") as tmp:
        workdir = Path(tmp)
        if "kill" in scenarios:
            results["kill (plain)"] = await scenario_kill(workdir, stream=False)
            results["kill (stream)"] = await scenario_kill(workdir, stream=True)
        if "rejoin" in scenarios:  # default health settings (5 s checks, 30 s ejection)
            results["kill (plain, default health)"] = await scenario_kill(
                workdir, stream=False, concurrency=4, after_restart_s=40, fast_health=False)
        if "restart" in scenarios:
            results["router restart"] = await scenario_restart(workdir)
        if "stall" in scenarios:
            results["stall"] = await scenario_stall(workdir)
        if "events" in scenarios:
            results["events"] = await scenario_events(workdir)
        if "fuzz" in scenarios:
            results["fuzz"] = await scenario_fuzz(workdir, args.fuzz_examples)
        if "soak" in scenarios:
            results["soak"] = await scenario_soak(workdir, args.soak_s)
    for name, figures in results.items():
        print(f"{name}: {json.dumps(figures)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "backend":
        parser = argparse.ArgumentParser()
        parser.add_argument("backend")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--log", required=True)
        a = parser.parse_args()
        _backend_main(a.port, a.log)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="kill,restart,stall,events,fuzz,soak")
    parser.add_argument("--soak-s", type=float, default=600.0, help="soak seconds (600)")
    parser.add_argument("--fuzz-examples", type=int, default=3000)
    asyncio.run(main(parser.parse_args()))
