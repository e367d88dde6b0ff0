"""Fake OpenAI backends and router handles on real 127.0.0.1 sockets, importable by tests.

``FakeBackend`` speaks vLLM's OpenAI wire format (JSON bodies; SSE ``data: {json}\\n\\n`` chunks
ending with ``data: [DONE]\\n\\n``) and can be told to delay, fail with a status, stall, or cut
a stream mid-way. It records every request it got, byte for byte. (Kept out of ``conftest.py``:
``tests/e2e_vllm`` has its own conftest, and ``from conftest import`` would pick whichever
pytest loaded first.)
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from router.app import App, RouterState


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FakeBackend:
    """Knobs can be changed while it runs; ``url`` is set once it listens."""

    name: str = "backend"
    models: list[str] = field(default_factory=lambda: ["tiny"])
    delay_s: float = 0.0
    fail_status: int | None = None
    chunks: int = 3
    chunk_delay_s: float = 0.0
    break_after_chunks: int | None = None
    health_status: int = 200
    url: str = ""
    received: list[Received] = field(default_factory=list)
    cancelled: int = 0
    finished: int = 0
    runner: web.AppRunner | None = None

    async def stop(self) -> None:
        """Stop listening, as a crashed backend would (its port then refuses connections)."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/v1/{tail:.*}", self._generate)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "vllm", "max_model_len": 2048,
                 "root": m} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs, CIMultiDict(request.headers),
                                      body))
        try:
            return await self._answer(request, body)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_status is not None:
            return web.json_response(
                {"object": "error", "message": f"{self.name} failing", "type": "Internal",
                 "code": self.fail_status}, status=self.fail_status)
        if not request.path.endswith("/completions"):
            return web.json_response({"object": "list", "data": [], "path": request.path})
        try:
            payload = json.loads(body)
        except ValueError:
            return web.json_response({"object": "error", "message": "invalid JSON",
                                      "type": "BadRequestError", "code": 400}, status=400)
        chat = request.path.endswith("/chat/completions")
        base = {"id": f"cmpl-{self.name}", "created": int(time.time()),
                "model": payload.get("model", "")}
        if not payload.get("stream"):
            text = f"{self.name} " + " ".join(f"t{i}" for i in range(self.chunks))
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": "length"} if chat else
                {"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                 "stop_reason": None})
            self.finished += 1
            return web.json_response(base | {
                "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": self.chunks,
                          "total_tokens": 5 + self.chunks}}, headers={"X-Engine": self.name})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "X-Engine": self.name})
        await response.prepare(request)
        for i in range(self.chunks):
            if self.break_after_chunks is not None and i == self.break_after_chunks:
                assert request.transport is not None
                request.transport.close()  # a backend crash mid-stream
                return response
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            last = i == self.chunks - 1
            choice = (
                {"index": 0, "delta": {"content": f"{self.name}-t{i} "},
                 "finish_reason": "length" if last else None} if chat else
                {"index": 0, "text": f"{self.name}-t{i} ", "logprobs": None,
                 "finish_reason": "length" if last else None, "stop_reason": None})
            chunk = base | {"object": "chat.completion.chunk" if chat else "text_completion",
                            "choices": [choice]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.finished += 1
        return response


@dataclass
class RouterHandle:
    url: str
    state: RouterState
    app: App


async def wait_until_ok(session: Any, url: str, proc: Any = None, timeout_s: float = 60.0,
                        every_s: float = 0.1) -> None:
    """GET ``url`` until it answers 200: a router process started by a test is up. Fails
    with the process's stderr when it exits first (``proc``: an asyncio subprocess), and
    after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None:
            assert proc.returncode is None, (await proc.stderr.read()).decode()
        assert time.monotonic() < deadline, f"{url} never answered 200"
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(every_s)


async def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``predicate`` on the running loop until it holds; fail naming ``what`` after
    ``timeout_s`` (generous: it only bounds how long a failing test takes to say so)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
