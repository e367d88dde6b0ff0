"""Prefill/decode backends for the P/D tests: a small OpenAI front over ``simulator.emulator.pd``.

Each ``PdBackend`` is a real aiohttp server on 127.0.0.1 speaking vLLM's OpenAI wire format
(JSON, or SSE ``data: {json}`` chunks ending with ``data: [DONE]``; a final usage chunk with
``stream_options.include_usage``) and one of the P/D roles of either engine, with the protocol
fields handled by the emulator's ``PdNode`` (the same code ``kvrouter emulate`` uses). Prompt
tokens are characters / 4. Knobs: ``fail_status``, ``drop`` (close the connection without an
answer), ``delay_s``, ``omit_params`` (a vLLM prefill that forgets its transfer parameters).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from policies.types import EngineKind, Role
from simulator.emulator.pd import PdError, PdNode


def prompt_tokens_of(body: dict[str, Any]) -> int:
    if "messages" in body:
        text = "".join(str(m.get("content") or "") for m in body["messages"])
    else:
        text = str(body.get("prompt", ""))
    return max(math.ceil(len(text) / 4), 1)


@dataclass
class PdBackend:
    node: PdNode
    fail_status: int | None = None
    drop: bool = False
    delay_s: float = 0.0
    omit_params: bool = False
    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    cancelled: int = 0
    runner: web.AppRunner | None = None
    session: aiohttp.ClientSession | None = None

    @property
    def port(self) -> int:
        return self.node.port

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.add_routes(self.node.routes())
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "tiny", "object": "model", "owned_by": "vllm", "max_model_len": 65536}]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.raw.append(raw)
        self.received.append(body)
        try:
            return await self._answer(request, body)
        except asyncio.CancelledError:
            self.cancelled += 1
            if self.node.role is Role.PREFILL and isinstance(body.get("bootstrap_room"), int):
                self.node.fail_room(body["bootstrap_room"])
            raise

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_status is not None:
            if isinstance(body.get("bootstrap_room"), int) and self.node.role is Role.PREFILL:
                self.node.fail_room(body["bootstrap_room"])
            return _error(f"{self.node.engine_id} failing", self.fail_status)
        prompt = prompt_tokens_of(body)
        try:
            plan = self.node.plan(body, prompt)
            computed = plan.compute_prompt_tokens
            if plan.pull is not None:
                assert self.session is not None
                computed = await self.node.pull(self.session, plan.pull)
        except PdError as error:
            return _error(error.message, error.status)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            return _error("max_tokens is required by this fake", 400)
        max_tokens = int(body.get("max_completion_tokens") or body["max_tokens"])
        max_tokens = min(max_tokens, plan.max_tokens or max_tokens)
        self.node.computed_prompt_tokens += computed
        self.node.generated_tokens += max_tokens
        if plan.room is not None:
            self.node.deposit(plan.room, prompt)
        extra: dict[str, Any] = {}
        if plan.export and not self.omit_params:
            extra["kv_transfer_params"] = self.node.export(prompt, time.monotonic())
        chat = request.path.endswith("/chat/completions")
        usage = {"prompt_tokens": prompt, "completion_tokens": max_tokens,
                 "total_tokens": prompt + max_tokens}
        base = {"id": f"cmpl-{self.node.engine_id}", "created": int(time.time()),
                "model": body.get("model", "")}
        words = [f"{self.node.engine_id}-t{i}" for i in range(max_tokens)]
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                       "finish_reason": "length"} if chat else
                      {"index": 0, "text": " ".join(words), "finish_reason": "length"})
            return web.json_response(base | extra | {
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"
        for i, word in enumerate(words):
            last = i == len(words) - 1
            choice = ({"index": 0, "delta": {"content": word + " "},
                       "finish_reason": "length" if last else None} if chat else
                      {"index": 0, "text": word + " ", "finish_reason": "length" if last else None})
            await response.write(b"data: " + json.dumps(
                base | {"object": kind, "choices": [choice]}).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(b"data: " + json.dumps(
                base | {"object": kind, "choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": "BadRequestError"
                              if status < 500 else "InternalServerError", "code": status},
                             status=status)


async def start_pd(role: Role, engine: EngineKind, name: str, session: aiohttp.ClientSession,
                   **knobs: Any) -> PdBackend:
    backend = PdBackend(PdNode(role, engine, name, network_bytes_per_s=1e12), **knobs)
    backend.session = session
    runner = web.AppRunner(backend.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend.runner = runner
    backend.node.port = int(runner.addresses[0][1])
    backend.url = f"http://127.0.0.1:{backend.node.port}"
    return backend
