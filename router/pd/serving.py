"""Serving a split decision: the prefill leg, the decode leg, retries, fallbacks and metrics.

The proxy hands over any ``Decision`` with ``prefill_backend_id`` set (it never asks which
policy made it). The protocol follows the decode backend's engine kind: vLLM is sequential
(``router.pd.vllm``), SGLang concurrent (``router.pd.sglang``). Failures, each before anything
reached the client:

    prefill fails or times out  -> the next prefill backend (the policy chooses among the PREFILL
                                   backends not tried), at most ``max_prefill_attempts`` in all,
                                   then local prefill on a decode backend (``fallback_to_local``)
    prefill answers 4xx         -> that answer goes to the client (the request itself is bad)
    decode fails (connect, timeout, 502/503/504)
                                -> vLLM: another decode backend with the same transfer
                                   parameters (the prefill backend holds the blocks until pulled);
                                   SGLang: the prefill is redone with a new room on another
                                   decode backend (a room pairs one prefill with one decode)

Every path ends in the decode backend's response or one OpenAI-shaped error. The split path
re-serializes the client's JSON because it adds fields; the local fallback forwards the
client's bytes unchanged. Transfer parameters are never logged.

Its settings are ``config.disaggregation.serving`` (``router.config.disaggregation``). What
this needs from the router comes in one ``PdContext``: the aiohttp session (the prefill legs, which read one
JSON answer), the keep-alive client and the proxy's relay (the decode leg, relayed exactly as
a single backend's answer), the pool, the policy's hooks, the router's view -> decide path for
replacement backends, and metrics. Must not import ``router.proxy`` (which builds this),
``router.app`` or ``simulator``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict
from prometheus_client import Counter, Histogram

from policies.disaggregation import is_disaggregated
from policies.types import (
    BackendId,
    BackendState,
    ClusterView,
    Decision,
    EngineKind,
    Policy,
    Role,
    RouteRequest,
)
from router.attempt import (
    RETRY_STATUSES,
    Retry,
    backend_attempt,
    holding_upstream,
    routed_header_lines,
)
from router.config import Config
from router.errors import (
    NoBackend,
    RouterError,
    UpstreamConnectError,
    UpstreamTimeout,
)
from router.http.client import (
    ConnectFailed,
    HeadTimeout,
    HttpClient,
    ResponseBroken,
    UpstreamResponse,
)
from router.http.messages import Request, Response, StreamResponse
from router.http.upstream import hop_by_hop
from router.metrics import RouterMetrics
from router.pd import sglang, vllm
from router.pd.vllm import PrefillFailed
from router.pool import Backend, BackendPool
from router.prompt.analyzer import RequestFields

__all__ = ["Disaggregation", "PdContext", "Relay"]

# The proxy's relay of one backend's answer: (response, True) at a clean end, False when the
# backend broke it, None when the client went away.
Relay = Callable[
    [Request, UpstreamResponse, bytes, Backend, RequestFields, Decision, RouteRequest],
    Awaitable[tuple[Response | StreamResponse, bool | None]],
]


@dataclass(frozen=True, slots=True)
class PdContext:
    """What serving a split needs from the router, and nothing more."""

    config: Config
    pool: BackendPool
    policy: Policy  # its on_dispatched / on_finished hooks
    metrics: RouterMetrics
    rng: random.Random
    # The router's one view -> decide path: candidates of a model (minus the tried ones, in
    # the given roles), or None when there are none; then the policy's checked decision.
    view: Callable[[str, float, Sequence[BackendId], frozenset[Role] | None], ClusterView | None]
    decide: Callable[[RouteRequest, ClusterView], Decision]
    relay: Relay
    # Both created at the app's start-up, after this context: read when a request needs them.
    client: Callable[[], HttpClient]
    session: Callable[[], aiohttp.ClientSession]
    finished: Callable[[], None]  # a request left the router (its hold may admit the next)

log = logging.getLogger("kvrouter.disagg")

_PREFILL_ROLES = frozenset({Role.PREFILL})
_DECODE_ROLES = frozenset({Role.DECODE, Role.MIXED})


class Disaggregation:
    def __init__(self, ctx: PdContext) -> None:
        self.ctx = ctx
        self.config = ctx.config.disaggregation.serving
        r = ctx.metrics.registry
        self.decisions = Counter(
            "kvrouter_pd_decisions", "Decisions in disaggregated pools: split or local.",
            ["mode"], registry=r)
        self.legs = Counter(
            "kvrouter_pd_legs", "Requests sent to backends on the split path, by role.",
            ["role", "backend"], registry=r)
        self.failures = Counter(
            "kvrouter_pd_transfer_failures", "Failed prefill or decode legs of split requests.",
            ["stage", "reason"], registry=r)
        self.fallbacks = Counter(
            "kvrouter_pd_fallbacks", "What the router did after a failed leg.", ["action"],
            registry=r)
        self.prefill_duration = Histogram(
            "kvrouter_pd_prefill_duration_seconds", "Prefill leg duration, successful legs.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0),
            registry=r)

    def observe(self, decision: Decision, candidates: tuple[BackendState, ...]) -> None:
        if is_disaggregated(candidates):
            self.decisions.labels("split" if decision.prefill_backend_id else "local").inc()

    # ---- choosing replacements ----------------------------------------------------------

    def _next(self, route_request: RouteRequest, model: str, roles: frozenset[Role],
              tried: list[str]) -> Backend | None:
        ctx = self.ctx
        view = ctx.view(model, time.monotonic(), tried, roles)
        if view is None:
            return None
        # One role only: the decider answers locally, i.e. the inner policy's best backend.
        return ctx.pool.get(ctx.decide(route_request, view).backend_id)

    # ---- the legs ---------------------------------------------------------------------------

    async def _prefill(self, backend: Backend, fields: RequestFields,
                       route_request: RouteRequest, body: Mapping[str, Any]) -> bytes:
        ctx = self.ctx
        tokens = route_request.prompt_tokens
        ctx.pool.acquire(backend.backend_id, tokens, time.monotonic())
        in_flight, _, _ = ctx.metrics.for_backend(backend.backend_id)
        in_flight.inc()
        self.legs.labels("prefill", backend.backend_id).inc()
        started_s = time.monotonic()
        verdict: bool | None = None
        try:
            _, payload = await vllm.post_prefill(
                ctx.session(), backend.backend_id, backend.url + fields.path, body,
                _forward_headers(fields),
                self.config.prefill_timeout_s, ctx.config.upstream.connect_timeout_s)
            verdict = True
            self.prefill_duration.observe(time.monotonic() - started_s)
            return payload
        except PrefillFailed as failed:
            verdict = failed.client_error
            self.failures.labels("prefill", failed.reason).inc()
            log.info("request %s: prefill on %s failed: %s", fields.request_id,
                     backend.backend_id, failed.reason)
            raise
        finally:
            ctx.pool.release(backend, tokens)
            in_flight.dec()
            backend.breaker.record(verdict, time.monotonic())

    async def _open(self, backend: Backend, fields: RequestFields, data: bytes,
                    gate: asyncio.Task[bytes] | None) -> UpstreamResponse:
        """Send the decode request (through the router's keep-alive client); with a
        ``gate`` (SGLang's concurrent prefill) the answer is held back until the prefill
        succeeded, and a failed prefill wins the race."""
        ctx = self.ctx
        headers = [(k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in _forward_headers(fields).items()]
        opening = asyncio.ensure_future(ctx.client().request(
            backend.url, "POST", fields.path.encode("utf-8", "surrogateescape"), headers,
            data))
        try:
            async with asyncio.timeout(ctx.config.upstream.first_byte_timeout_s):
                if gate is not None:
                    await asyncio.wait({opening, gate}, return_when=asyncio.FIRST_COMPLETED)
                    if gate.done():
                        gate.result()
                upstream = await opening
                if gate is not None:
                    await gate
                return upstream
        except BaseException as exc:
            opening.cancel()
            await asyncio.wait({opening})
            if not opening.cancelled() and opening.exception() is None:
                opening.result().close()
            if isinstance(exc, TimeoutError | HeadTimeout):
                raise Retry(UpstreamTimeout(
                    f"decode backend {backend.backend_id} did not answer in time"),
                    "timeout") from None
            if isinstance(exc, ConnectFailed | ResponseBroken):
                raise Retry(UpstreamConnectError(
                    f"could not reach decode backend {backend.backend_id}: {exc}"),
                    "connect") from None
            raise

    async def _decode(self, request: Request, fields: RequestFields,
                      route_request: RouteRequest, decision: Decision, backend: Backend, data: bytes, prompt_tokens: int, last: bool,
                      gate: asyncio.Task[bytes] | None, mode: str) -> Response | StreamResponse:
        ctx = self.ctx
        self.legs.labels("decode", backend.backend_id).inc()
        started_s = time.monotonic()
        with backend_attempt(ctx.pool, ctx.metrics, backend, prompt_tokens,
                             started_s) as slot:
            try:
                upstream = await self._open(backend, fields, data, gate)
            except Retry:
                slot.verdict = False
                raise
            slot.ttfb.observe(time.monotonic() - started_s)
            with holding_upstream(upstream, ctx.metrics, slot):
                status = upstream.status
                slot.verdict = status < 500
                if status in RETRY_STATUSES and not last:
                    raise Retry(UpstreamConnectError(
                        f"decode backend {backend.backend_id} answered {status}"),
                        f"status_{status}")
                headers = routed_header_lines(
                    upstream.raw_headers, fields.request_id, backend.backend_id,
                    decision.predicted_hit_tokens) + b"x-kvrouter-pd: %b\r\n" % mode.encode()
                response, outcome = await ctx.relay(
                    request, upstream, headers, backend, fields, decision, route_request)
                slot.verdict = None if outcome is None else slot.verdict and outcome
                ctx.metrics.count(backend.backend_id, response.status)
                return response

    # ---- the flows --------------------------------------------------------------------------

    async def serve(self, request: Request, body: bytes, fields: RequestFields,
                    route_request: RouteRequest, decision: Decision) -> Response | StreamResponse:
        ctx = self.ctx
        decode = ctx.pool.get(decision.backend_id)
        prefill = ctx.pool.get(decision.prefill_backend_id or "")
        if decode is None:
            raise NoBackend(f"decode backend {decision.backend_id} left the pool")
        ctx.policy.on_dispatched(route_request, decision, time.monotonic())
        ok = False
        try:
            # The pool may hold the engine as its config string; compare by value.
            flow = self._sglang if EngineKind(decode.engine) is EngineKind.SGLANG else self._vllm
            response = await flow(request, body, fields, route_request, decision, prefill, decode)
            ok = response.status < 400
            return response
        finally:
            ctx.policy.on_finished(route_request, decision, time.monotonic(), ok)
            ctx.finished()

    async def _vllm(self, request: Request, body: bytes, fields: RequestFields,
                    route_request: RouteRequest, decision: Decision, prefill: Backend | None,
                    decode: Backend) -> Response | StreamResponse:
        tried: list[str] = []
        error: RouterError | None = None
        for _ in range(self.config.max_prefill_attempts):
            if prefill is None:
                break
            tried.append(prefill.backend_id)
            try:
                payload = await self._prefill(
                    prefill, fields, route_request, vllm.prefill_body(fields.body))
            except PrefillFailed as failed:
                if failed.client_error:
                    return _surface(failed, fields, prefill)
                error = failed.error
            else:
                params = vllm.transfer_params_of(payload)
                if params is not None:
                    data = _dump(vllm.decode_body(fields.body, params))
                    # The prefill backend holds the blocks for whichever decode backend pulls
                    # them: a failed decode is retried elsewhere with the same parameters.
                    return await self._decodes(request, fields, route_request, decision,
                                               decode, data, 0, "split", "retry_decode",
                                               _DECODE_ROLES)
                self.failures.labels("prefill", "no_transfer_params").inc()
                error = UpstreamConnectError(
                    f"prefill backend {prefill.backend_id} returned no kv_transfer_params")
            prefill = self._next(route_request, fields.model, _PREFILL_ROLES, tried)
            if prefill is not None:
                self.fallbacks.labels("retry_prefill").inc()
        return await self._local(request, body, fields, route_request, decision, decode, error)

    async def _sglang(self, request: Request, body: bytes, fields: RequestFields,
                      route_request: RouteRequest, decision: Decision, prefill: Backend | None,
                      decode: Backend | None) -> Response | StreamResponse:
        cfg = self.config
        tried_prefill: list[str] = []
        tried_decode: list[str] = []
        error: RouterError | None = None
        prefill_failures = decode_failures = 0
        while prefill is not None and decode is not None:
            host, port = sglang.bootstrap_of(prefill.url, cfg.bootstrap_hosts,
                                                cfg.bootstrap_ports, cfg.bootstrap_port)
            room = sglang.new_room(self.ctx.rng)
            paired = sglang.bootstrap_body(fields.body, host, port, room)
            gate = asyncio.create_task(self._prefill(prefill, fields, route_request, paired))
            try:
                return await self._decode(request, fields, route_request, decision, decode,
                                          _dump(paired), 0,
                                          decode_failures + 1 >= cfg.max_decode_attempts, gate,
                                          "split")
            except PrefillFailed as failed:
                if failed.client_error:
                    return _surface(failed, fields, prefill)
                error, prefill_failures = failed.error, prefill_failures + 1
                tried_prefill.append(prefill.backend_id)
                if prefill_failures >= cfg.max_prefill_attempts:
                    break
                prefill = self._next(route_request, fields.model, _PREFILL_ROLES, tried_prefill)
                if prefill is not None:
                    self.fallbacks.labels("retry_prefill").inc()
            except Retry as retry:
                self.failures.labels("decode", retry.reason).inc()
                log.info("request %s: decode on %s failed: %s", fields.request_id,
                         decode.backend_id, retry.reason)
                error, decode_failures = retry.error, decode_failures + 1
                tried_decode.append(decode.backend_id)
                if decode_failures >= cfg.max_decode_attempts:
                    raise retry.error from None
                # The room paired this prefill with the failed decode backend: start over.
                decode = self._next(route_request, fields.model, _DECODE_ROLES, tried_decode)
                if decode is not None:
                    self.fallbacks.labels("redo_prefill").inc()
            finally:
                if not gate.done():
                    gate.cancel()
                await asyncio.wait({gate})
                if not gate.cancelled():
                    gate.exception()  # retrieved: a failure was handled above or superseded
        if decode is None:
            raise error or NoBackend("no decode backend left")
        return await self._local(request, body, fields, route_request, decision, decode, error)

    async def _local(self, request: Request, body: bytes, fields: RequestFields,
                     route_request: RouteRequest, decision: Decision, decode: Backend,
                     error: RouterError | None) -> Response | StreamResponse:
        if not self.config.fallback_to_local:
            raise error or NoBackend("no prefill backend left")
        roles = _DECODE_ROLES
        if EngineKind(decode.engine) is EngineKind.SGLANG:
            # An SGLang decode-mode server serves only bootstrapped requests: local prefill
            # needs a MIXED one.
            roles = frozenset({Role.MIXED})
            if decode.role is not Role.MIXED:
                found = self._next(route_request, fields.model, roles, [])
                if found is None:
                    raise error or NoBackend("no backend can prefill locally")
                decode = found
        self.fallbacks.labels("local_prefill").inc()
        return await self._decodes(request, fields, route_request, decision, decode, body,
                                   route_request.prompt_tokens, "local_fallback", "retry_local",
                                   roles)

    async def _decodes(self, request: Request, fields: RequestFields,
                       route_request: RouteRequest, decision: Decision, decode: Backend | None,
                       data: bytes, prompt_tokens: int, mode: str, action: str,
                       roles: frozenset[Role]) -> Response | StreamResponse:
        tried: list[str] = []
        attempts = self.config.max_decode_attempts
        error: RouterError = NoBackend("no decode backend left")
        for attempt in range(attempts):
            if decode is None:
                break
            tried.append(decode.backend_id)
            try:
                return await self._decode(request, fields, route_request, decision, decode, data,
                                          prompt_tokens, attempt == attempts - 1, None, mode)
            except Retry as retry:
                self.failures.labels("decode", retry.reason).inc()
                log.info("request %s: decode on %s failed: %s", fields.request_id,
                         decode.backend_id, retry.reason)
                error = retry.error
            decode = self._next(route_request, fields.model, roles, tried)
            if decode is not None and attempt < attempts - 1:
                self.fallbacks.labels(action).inc()
        raise error


def _forward_headers(fields: RequestFields) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones; the body is re-serialized JSON."""
    out: CIMultiDict[str] = CIMultiDict()
    items = fields.headers.items()
    drop = hop_by_hop(items)
    for name, value in items:
        if name.lower() not in drop and name.lower() not in ("x-request-id", "content-type"):
            out.add(name, value)
    out["x-request-id"] = fields.request_id
    out["Content-Type"] = "application/json"
    return out


def _dump(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _surface(failed: PrefillFailed, fields: RequestFields, prefill: Backend) -> Response:
    """The prefill backend rejected the request: the client gets that answer as it was."""
    return Response(status=failed.status or 400, body=failed.body,
                    content_type=failed.content_type,
                    headers={"x-request-id": fields.request_id,
                             "x-kvrouter-backend": prefill.backend_id,
                             "x-kvrouter-pd": "prefill_error"})
