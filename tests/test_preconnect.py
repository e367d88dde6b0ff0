"""``upstream.preconnect``: after each healthy probe the proxy keeps idle connections open to
the backend, so the first request after start-up goes out on one instead of waiting for a
connect (which, in a burst, completes only after the loop has handled the burst's other
requests). A raw server on a real socket records when it accepted each connection and on which
one each request came."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from fake_backend import RouterHandle

MODELS = json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]}).encode()
ANSWER = json.dumps({"id": "x", "object": "text_completion", "choices": [
    {"index": 0, "text": "ok", "finish_reason": "stop"}]}).encode()


class AcceptLog:
    def __init__(self) -> None:
        self.accepted: dict[int, float] = {}  # connection number -> accept time
        self.completions: list[int] = []  # the connection each completion came on

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(self.accepted)
        self.accepted[number] = time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                body = b"{}"
                if path.startswith(b"/v1/models"):
                    body = MODELS
                elif path.startswith(b"/v1/completions"):
                    self.completions.append(number)
                    body = ANSWER
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("preconnect", [2, 0])
async def test_the_first_request_goes_out_on_a_connection_opened_before_it(
    start_router: Callable[..., Awaitable[RouterHandle]], http: aiohttp.ClientSession,
    preconnect: int,
) -> None:
    log = AcceptLog()
    server = await asyncio.start_server(log.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        handle = await start_router({"backends": [url], "health": {"interval_s": 60},
                                     "upstream": {"preconnect": preconnect}})
        await asyncio.sleep(0.3)  # the first health round, and the connections it opens
        idle = len(log.accepted)
        sent_s = time.monotonic()
        async with http.post(f"{handle.url}/v1/completions",
                             json={"model": "tiny", "prompt": "hi", "max_tokens": 1}) as resp:
            assert resp.status == 200
            await resp.read()
        (connection,) = log.completions
        if preconnect:
            # The health check's own client and the two pre-opened connections.
            assert idle == 1 + preconnect
            assert log.accepted[connection] < sent_s
            assert len(log.accepted) == idle  # no connect on the request's path
        else:
            assert idle == 1
            assert log.accepted[connection] > sent_s
    finally:
        server.close()
