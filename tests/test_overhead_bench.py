"""bench/overhead.py's harness cannot rot: its bare-protocol 0-latency backend answers what the
routers send (real sockets, keep-alive, pipelined requests, streaming, the probes), and its
wrk client measures a slice against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import overhead  # noqa: E402
import wrk_client  # noqa: E402
import zero_backend  # noqa: E402
from ports import free_port  # noqa: E402


@pytest.fixture
async def backend() -> str:
    port = free_port()
    task = asyncio.create_task(zero_backend.serve([port]))
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            await asyncio.sleep(0.02)
    yield url  # type: ignore[misc]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_backend_answers_plain_streamed_and_probes(backend: str) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 16}
        async with session.post(backend + "/v1/completions", json=body) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["finish_reason"] == "length"
        async with session.post(backend + "/v1/chat/completions",
                                json={**body, "stream": True}) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            events = [e for e in (await r.text()).split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert len(events) == zero_backend.SSE_CHUNKS + 1
        assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == " ok"
        for path in ("/health", "/get_server_info", "/v1/models"):
            async with session.get(backend + path) as r:
                assert r.status == 200, path
                await r.json()
        async with session.get(backend + "/nope") as r:
            assert r.status == 404


async def test_backend_serves_pipelined_requests_split_anywhere_and_refuses_chunked(
        backend: str) -> None:
    port = int(backend.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b'{"prompt": "x"}'
    one = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
           % (len(payload), payload))
    data = one * 3
    for i in range(0, len(data), 7):  # the head and the body arrive in pieces
        writer.write(data[i:i + 7])
        await writer.drain()
        await asyncio.sleep(0)
    answers = []
    for _ in range(3):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        answers.append((head.split(b"\r\n")[0], json.loads(await reader.readexactly(length))))
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 3
    writer.write(b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 411")
    writer.close()
    await writer.wait_closed()


@pytest.mark.skipif(not wrk_client.available(), reason="wrk is not installed (apt-get install "
                    "wrk); bench/overhead.py falls back to --client python without it")
@pytest.mark.parametrize("unique", [False, True])
async def test_wrk_slice_sends_the_benchmark_bodies(unique: bool) -> None:
    prompts: list[str] = []

    async def record(request: web.Request) -> web.Response:
        prompts.append((await request.json())["prompt"])
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_post("/v1/completions", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}"
        bodies = overhead.Bodies("The quick brown fox jumps. " * 40, False, unique)
        result = await asyncio.to_thread(wrk_client.run_slice, [url, url], 3, 1,
                                         *bodies.pieces()[:3], unique, 0)
    finally:
        await runner.cleanup()
    assert result.requests > 20 and result.errors == 0
    assert 0 < result.p50_s <= result.p99_s < 1.0
    assert 0.9 < result.seconds < 2.0
    assert len(prompts) >= result.requests
    if unique:  # every prompt differs, and only by its numbers
        assert len(set(prompts)) == len(prompts)
        words = {w for p in prompts for w in p.split() if not w.isdigit()}
        assert words == {"The", "quick", "brown", "fox", "jumps."}
    else:
        assert set(prompts) == {"The quick brown fox jumps. " * 40}
