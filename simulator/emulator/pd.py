"""The emulator's prefill/decode roles and both engines' P/D protocols (async, aiohttp).

One ``PdNode`` per emulated backend. Its front calls ``plan`` with each request body; the plan
says how many prompt tokens this backend computes itself, what to pull first and what to
export afterwards:

- vLLM (NixlConnector): a request with ``kv_transfer_params.do_remote_decode`` is a prefill:
  it runs as asked (the router sets ``max_tokens: 1``) and ``export`` returns the
  ``kv_transfer_params`` for its answer, naming new block ids held for a pull (``hold_s``, like
  vLLM's abort timeout). A request with ``do_remote_prefill`` is a decode: it ``pull``s the
  named blocks from ``remote_host:remote_port`` (this module's ``POST /_pd/pull`` on the
  prefill backend's own HTTP port), minus the tokens it already holds cached (vLLM's connector
  loads only what is missing); a failed pull is recomputed locally, as vLLM's
  ``kv_load_failure_policy=recompute`` does.
- SGLang: PREFILL and DECODE backends require ``bootstrap_host``/``bootstrap_port``/
  ``bootstrap_room``. The prefill ``deposit``s the room once its prefill is done; the decode
  waits for that room at ``GET /_pd/bootstrap/{room}`` on the bootstrap server (the prefill
  backend's HTTP port; map it with the router's ``bootstrap_ports``) and fails when the room
  fails or never fills (``room_wait_s``), as SGLang aborts an unpaired request.

A pull costs ``transfer_setup_s + tokens * kv_bytes_per_token / network_bytes_per_s`` seconds,
slept by the decode side. Counters (``computed_prompt_tokens``, ``generated_tokens``,
``pulled_tokens``) make the split visible: a split request's prompt is computed on the prefill
backend and pulled, not computed, on the decode backend. Must not import ``router``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from policies.types import EngineKind, Role
from simulator.emulator.pod import EmulatedPod

__all__ = ["PD_KEY", "PdError", "PdNode", "PdPlan", "Pull"]


class PdError(Exception):
    """A request whose P/D fields this backend cannot serve (the front answers ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Pull:
    url: str
    payload: Mapping[str, Any] | None  # POST body (vLLM); None means GET (SGLang)
    tokens: int
    recompute_on_failure: bool


@dataclass(frozen=True, slots=True)
class PdPlan:
    compute_prompt_tokens: int
    pull: Pull | None = None
    export: bool = False
    room: int | None = None
    max_tokens: int | None = None  # a cap: SGLang's prefill server stops after the first token


def _int(body: Mapping[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PdError(f"'{key}' must be an integer for a {key.split('_')[0]} request")
    return value


class PdNode:
    def __init__(
        self,
        role: Role,
        engine: EngineKind,
        engine_id: str,
        *,
        block_size: int = 16,
        kv_bytes_per_token: int = 131072,
        network_bytes_per_s: float = 25e9,
        transfer_setup_s: float = 0.002,
        hold_s: float = 30.0,
        room_wait_s: float = 30.0,
        time_scale: float = 1.0,
    ) -> None:
        self.role = role
        self.engine = engine
        self.engine_id = engine_id
        self.block_size = block_size
        self.kv_bytes_per_token = kv_bytes_per_token
        self.network_bytes_per_s = network_bytes_per_s
        self.transfer_setup_s = transfer_setup_s
        self.hold_s = hold_s
        self.room_wait_s = room_wait_s
        self.time_scale = time_scale  # the emulator's: a virtual second lasts 1/time_scale s
        self.host = "127.0.0.1"
        self.port = 0  # set by the front once it listens
        self.computed_prompt_tokens = 0
        self.generated_tokens = 0
        self.pulled_tokens = 0
        self.failed_pulls = 0
        self._block_ids = itertools.count(1)
        self._exports: dict[int, tuple[int, float]] = {}  # first block id -> (tokens, expiry)
        self._rooms: dict[int, asyncio.Future[int]] = {}
        self._session: aiohttp.ClientSession | None = None

    # ---- planning -----------------------------------------------------------------------

    def plan(self, body: Mapping[str, Any], prompt_tokens: int, cached_tokens: int = 0) -> PdPlan:
        """Raises PdError for P/D fields this role cannot serve."""
        new = max(prompt_tokens - cached_tokens, 0)
        if self.engine is EngineKind.SGLANG:
            return self._plan_sglang(body, prompt_tokens, new)
        params = body.get("kv_transfer_params")
        if params is None:
            return PdPlan(new)
        if not isinstance(params, Mapping):
            raise PdError("'kv_transfer_params' must be an object")
        if params.get("do_remote_decode"):
            if self.role is Role.DECODE:
                raise PdError(f"{self.engine_id} is a decode backend: it does not export KV")
            return PdPlan(new, export=True)
        if params.get("do_remote_prefill"):
            if self.role is Role.PREFILL:
                raise PdError(f"{self.engine_id} is a prefill backend: it does not pull KV")
            ids = params.get("remote_block_ids")
            host, port = params.get("remote_host"), params.get("remote_port")
            if not isinstance(ids, list) or not ids or not isinstance(host, str) or not (
                    isinstance(port, int)) or not isinstance(params.get("remote_engine_id"), str):
                raise PdError("'kv_transfer_params' lacks remote_block_ids, remote_host, "
                              "remote_port or remote_engine_id")
            payload = {"remote_engine_id": params["remote_engine_id"], "remote_block_ids": ids}
            return PdPlan(0, pull=Pull(f"http://{host}:{port}/_pd/pull", payload, new, True))
        return PdPlan(new)

    def _plan_sglang(self, body: Mapping[str, Any], prompt_tokens: int, new: int) -> PdPlan:
        if self.role is Role.MIXED:
            return PdPlan(new)
        room = _int(body, "bootstrap_room")
        port = _int(body, "bootstrap_port")
        host = body.get("bootstrap_host")
        if not isinstance(host, str) or not host:
            raise PdError("'bootstrap_host' must be a host name for a bootstrap request")
        if self.role is Role.PREFILL:
            self._room(room)
            return PdPlan(new, room=room, max_tokens=1)
        # SGLang's decode side allocates the whole prompt and receives all of it.
        url = f"http://{host}:{port}/_pd/bootstrap/{room}"
        return PdPlan(0, pull=Pull(url, None, prompt_tokens, False))

    # ---- the prefill side -----------------------------------------------------------------

    def export(self, prompt_tokens: int, now_s: float) -> dict[str, Any]:
        """vLLM's ``kv_transfer_params`` answer of a prefill: the blocks held for a pull."""
        self._expire(now_s)
        n_blocks = max(math.ceil(prompt_tokens / self.block_size), 1)
        ids = [next(self._block_ids) for _ in range(n_blocks)]
        self._exports[ids[0]] = (prompt_tokens, now_s + self.hold_s)
        return {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": ids,
            "remote_engine_id": self.engine_id, "remote_host": self.host,
            "remote_port": self.port, "tp_size": 1,
        }

    def _room(self, room: int) -> asyncio.Future[int]:
        future = self._rooms.get(room)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._rooms[room] = future
            asyncio.get_running_loop().call_later(self.hold_s + self.room_wait_s,
                                                  self._rooms.pop, room, None)
        return future

    def deposit(self, room: int, tokens: int) -> None:
        future = self._room(room)
        if not future.done():
            future.set_result(tokens)

    def fail_room(self, room: int) -> None:
        future = self._room(room)
        if not future.done():
            future.set_exception(PdError(f"prefill of room {room} failed", 502))
            future.exception()  # a decode may never come to read it

    def _expire(self, now_s: float) -> None:
        for first, (_, expiry) in list(self._exports.items()):
            if expiry < now_s:
                del self._exports[first]

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/_pd/pull", self._serve_pull),
                web.get("/_pd/bootstrap/{room}", self._serve_room)]

    async def _serve_pull(self, request: web.Request) -> web.Response:
        payload = await request.json()
        ids = payload.get("remote_block_ids") or [None]
        self._expire(time.monotonic())
        held = self._exports.pop(ids[0], None)
        if payload.get("remote_engine_id") != self.engine_id or held is None:
            return web.json_response({"error": "no such blocks"}, status=404)
        return web.json_response({"tokens": held[0]})

    async def _serve_room(self, request: web.Request) -> web.Response:
        try:
            room = int(request.match_info["room"])
        except ValueError:
            return web.json_response({"error": "bad room"}, status=400)
        try:
            async with asyncio.timeout(self.room_wait_s):
                tokens = await asyncio.shield(self._room(room))
        except TimeoutError:
            return web.json_response({"error": f"room {room} never filled"}, status=504)
        except PdError as error:
            return web.json_response({"error": error.message}, status=error.status)
        self._rooms.pop(room, None)
        return web.json_response({"tokens": tokens})

    # ---- the decode side ------------------------------------------------------------------

    def transfer_s(self, tokens: int) -> float:
        return self.transfer_setup_s + tokens * self.kv_bytes_per_token / self.network_bytes_per_s

    async def pull(self, session: aiohttp.ClientSession | None, pull: Pull) -> int:
        """Fetch the KV; returns the prompt tokens still to compute here (0 on success).
        Raises PdError when the protocol cannot recompute (SGLang)."""
        if session is None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            session = self._session
        try:
            timeout = aiohttp.ClientTimeout(total=self.room_wait_s + 5.0)
            if pull.payload is not None:
                response = await session.post(pull.url, json=pull.payload, timeout=timeout)
            else:
                response = await session.get(pull.url, timeout=timeout)
            async with response:
                ok = response.status == 200
                detail = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, detail = False, exc.__class__.__name__
        if not ok:
            self.failed_pulls += 1
            if pull.recompute_on_failure:
                return pull.tokens
            raise PdError(f"KV transfer failed: {detail}", 502)
        await asyncio.sleep(self.transfer_s(pull.tokens) / self.time_scale)
        self.pulled_tokens += pull.tokens
        return 0

    # ---- the emulator's hooks (simulator.emulator.http) -----------------------------------

    def attach(self, app: web.Application) -> None:
        app[PD_KEY] = self
        app.add_routes(self.routes())
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def prepare(self, pod: EmulatedPod, body: Mapping[str, Any],
                      token_ids: list[int]) -> tuple[PdPlan, int]:
        """Plan one request on ``pod`` and pull the KV a decode needs: (plan, pulled tokens).
        Pulled blocks land in the pod's prefix cache (with their KV events), where the
        engine's admission finds them. Raises PdError."""
        keys = pod.block_keys(token_ids)
        prompt = len(token_ids)
        plan = self.plan(body, prompt, pod.engine.peek_cached_tokens(keys, prompt))
        if plan.pull is None or await self.pull(None, plan.pull):
            return plan, 0
        events: list[Any] = []
        cache = pod.engine.cache
        if keys and cache.allocate_anonymous(len(keys), events):
            cache.store(keys, None, token_ids[: len(keys) * pod.config.block_size], events)
            cache.release(keys, 0, events)
            if pod.publisher is not None:
                pod.publisher.publish(tuple(events))
        return plan, plan.pull.tokens

    def submitted(self, pod: EmulatedPod, pulled_tokens: int) -> None:
        # vllm:prompt_tokens_total counts prefilled tokens: pulled ones were prefilled
        # elsewhere, which is what makes a split visible per pod.
        pod.engine.prompt_tokens_total -= pulled_tokens

    def answer(self, response: web.Response, plan: PdPlan, prompt_tokens: int) -> None:
        """A vLLM prefill's whole answer carries the transfer parameters."""
        if plan.export and isinstance(response.body, bytes):
            data = json.loads(response.body)
            data["kv_transfer_params"] = self.export(prompt_tokens, time.monotonic())
            response.body = json.dumps(data, separators=(",", ":")).encode()

    def finished(self, plan: PdPlan, prompt_tokens: int, ok: bool) -> None:
        """An SGLang prefill fills its room when done, or fails it (the decode then fails)."""
        if plan.room is not None:
            if ok:
                self.deposit(plan.room, prompt_tokens)
            else:
                self.fail_room(plan.room)


PD_KEY = web.AppKey("kvrouter_pd", PdNode)
