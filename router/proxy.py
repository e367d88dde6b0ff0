"""Forwarding: one request in, a policy-chosen backend, the response relayed back.

The body is read and parsed once (``router.prompt.analyzer.read_fields``) and forwarded byte for
byte. Each attempt acquires the backend in the pool, calls the policy's ``on_dispatched`` (as
soon as the request's bytes are written to a kept-alive connection, else before connecting:
``HttpClient.request``'s ``sent``) and always balances it with ``on_finished`` and a release,
whatever happens (errors, client disconnects, cancellation). Retries go to a different backend
and only before the first response byte (connect error, timeout, 502/503/504); after it, a
broken stream ends with one SSE ``data: {"error": ...}`` event. Streams are relayed chunk by
chunk as they arrive.

Must not import ``router.app`` (the app wires this in) or ``simulator``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Sequence

import aiohttp
import orjson

from policies.bookkeeping import PolicyChoiceError, decide
from policies.types import (
    BackendId,
    ClusterView,
    Decision,
    Policy,
    PrefixLookup,
    Role,
    RouteRequest,
)
from router.attempt import (
    RETRY_STATUSES,
    Retry,
    backend_attempt,
    holding_upstream,
    routed_header_lines,
    routing_headers,
)
from router.config import Config
from router.errors import (
    InvalidRequest,
    NoBackend,
    RequestTooLarge,
    RouterError,
    UnknownModel,
    UpstreamConnectError,
    UpstreamTimeout,
    error_body,
    error_response,
)
from router.hold import RouterHold
from router.http.client import (
    ConnectFailed,
    HeadTimeout,
    HttpClient,
    ResponseBroken,
    UpstreamResponse,
)
from router.http.messages import BodyTooLarge, Request, Response, StreamResponse
from router.http.upstream import forward_headers
from router.metrics import NO_BACKEND, RouterMetrics
from router.pd.serving import Disaggregation, PdContext
from router.pool import Backend, BackendPool
from router.prompt.analyzer import RequestAnalyzer, RequestFields, read_fields

__all__ = ["Proxy"]

log = logging.getLogger("kvrouter.proxy")

_SSE = "text/event-stream"


def parse_json(body: bytes) -> object:
    """orjson parses a request body ~3.5x faster than ``json`` (bench/README.md); ``json``
    still decides what orjson refuses but Python accepts (NaN, integers past 64 bits, lone
    surrogate escapes, UTF-16/32 bodies), so no body a backend would take is rejected."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


class Proxy:
    def __init__(
        self,
        config: Config,
        pool: BackendPool,
        policy: Policy,
        analyzer: RequestAnalyzer,
        metrics: RouterMetrics,
        rng: random.Random,
        index: PrefixLookup | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.policy = policy
        self.analyzer = analyzer
        self.metrics = metrics
        self.rng = rng
        self.index = index
        # Both set by the app's start-up: the lean hot-path client, and aiohttp for the rest.
        self.client: HttpClient | None = None
        self.session: aiohttp.ClientSession | None = None
        self._request_id_prefix = os.urandom(8).hex()
        self._request_count = 0
        self.hold = RouterHold(config.policy.max_hold_s, metrics.registry)
        # Serves decisions with a prefill backend (prefill/decode disaggregation).
        self.disagg = Disaggregation(PdContext(
            config, pool, policy, metrics, rng, self.view, self.decide, self.relay,
            self._client, self._session, self.hold.release))

    def _client(self) -> HttpClient:
        assert self.client is not None, "the app's start-up creates the client"
        return self.client

    def _session(self) -> aiohttp.ClientSession:
        assert self.session is not None, "the app's start-up creates the session"
        return self.session

    async def preconnect(self, backend: Backend) -> int:
        """Top up ``backend``'s idle connections to ``upstream.preconnect`` (the health checker
        calls this after each healthy probe). Without them the first requests of a burst wait
        for connects, which complete only after the loop has handled the burst's other
        requests: 8 cold chats through a fresh router reached their backends at a median
        12.9 ms, against 8.5 ms with open connections (bench/cold_burst.py, bench/README.md)."""
        if self.client is None:
            return 0
        return await self.client.preconnect(backend.url, self.config.upstream.preconnect)

    def new_request_id(self) -> str:
        # Unique without a system call per request: a random per-process prefix and a count.
        self._request_count += 1
        return f"{self._request_id_prefix}{self._request_count:016x}"

    # -- reading the request ---------------------------------------------------------------

    async def read_request(
        self, request: Request, endpoint: str, request_id: str
    ) -> tuple[bytes, RequestFields, RouteRequest]:
        try:
            body = await request.read()
        except BodyTooLarge:
            raise RequestTooLarge(
                f"request body exceeds {self.config.server.max_body_bytes} bytes"
            ) from None
        parsed: object = None
        if body:
            try:
                parsed = parse_json(body)
            except (ValueError, UnicodeDecodeError):
                if endpoint != "other":
                    raise InvalidRequest("the request body is not valid JSON") from None
            except RecursionError:  # json's fallback, past orjson's 1,024 levels
                if endpoint != "other":
                    raise InvalidRequest("the request body's JSON is nested too deeply "
                                         "(over 1,000 levels)") from None
        elif endpoint != "other":
            raise InvalidRequest("the request body is empty; expected a JSON object")
        fields = read_fields(
            endpoint, request.raw_path, parsed, request.headers, request_id,
            self.config.server.session_header,
        )
        if fields.model and not self.pool.knows_model(fields.model):
            raise UnknownModel(f"the model '{fields.model}' does not exist", param="model")
        return body, fields, await self.analyzer.analyze(fields)

    # -- the one view -> decide path (the proxy, /debug/route and P/D replacements) ---------

    def view(self, model: str, now_s: float, exclude: Sequence[BackendId] = (),
             roles: frozenset[Role] | None = None) -> ClusterView | None:
        """What the policy sees for a request of ``model``; None when no backend serves it."""
        candidates = self.pool.snapshot(model, now_s, exclude, roles)
        return ClusterView(now_s, candidates, self.index) if candidates else None

    def decide(self, route_request: RouteRequest, view: ClusterView) -> Decision:
        try:
            return decide(self.policy, route_request, view)
        except PolicyChoiceError as error:  # a policy bug: the client gets a 500, not a hang
            raise RouterError(str(error)) from None

    # -- the proxy handler -----------------------------------------------------------------

    async def handle(self, request: Request, endpoint: str) -> Response | StreamResponse:
        started_s = time.monotonic()
        request_id = request.headers.get("x-request-id") or self.new_request_id()
        try:
            body, fields, route_request = await self.read_request(request, endpoint, request_id)
            return await self._dispatch(request, body, fields, route_request, started_s)
        except RouterError as error:
            self.metrics.count(NO_BACKEND, error.status)
            return error_response(error, {"x-request-id": request_id})

    def _backoff_s(self, attempt: int) -> float:
        r = self.config.retries
        delay_s = min(r.backoff_max_s, r.backoff_initial_s * r.backoff_multiplier ** (attempt - 1))
        return delay_s * (1.0 + r.jitter_ratio * (2.0 * self.rng.random() - 1.0))

    async def _dispatch(
        self,
        request: Request,
        body: bytes,
        fields: RequestFields,
        route_request: RouteRequest,
        started_s: float,
    ) -> Response | StreamResponse:
        tried: list[str] = []
        last_error: RouterError | None = None
        last_reason = ""
        attempts = self.config.retries.max_attempts
        for attempt in range(attempts):
            view = self.view(fields.model, time.monotonic(), tried)
            if view is None:
                break
            if not attempt and (self.hold or self.policy.defer(route_request, view)):
                # Late binding (router/hold.py): wait for room, then decide on a fresh view.
                await self.hold.wait(lambda: self._defer(route_request, fields.model))
                view = self.view(fields.model, time.monotonic(), tried)
                if view is None:
                    break
            if attempt:
                self.metrics.retries.labels(last_reason).inc()
                await asyncio.sleep(self._backoff_s(attempt))
                view = dataclasses.replace(view, now_s=time.monotonic())
            decision = self.decide(route_request, view)
            backend = self.pool.get(decision.backend_id)
            if backend is None:  # a candidate of this view: removed during a hold or backoff
                raise RouterError(f"backend {decision.backend_id!r} left the pool")
            self.disagg.observe(decision, view.backends)
            # The predicted hit belongs to where the prompt is prefilled.
            self.metrics.routed(decision.prefill_backend_id or decision.backend_id,
                                decision.reason, route_request.prompt_tokens,
                                decision.predicted_hit_tokens)
            if decision.prefill_backend_id is not None:
                return await self.disagg.serve(request, body, fields, route_request, decision)
            tried.append(backend.backend_id)
            try:
                return await self._attempt(
                    request, body, fields, route_request, backend, decision, started_s,
                    last=attempt == attempts - 1,
                )
            except Retry as retry:
                last_error, last_reason = retry.error, retry.reason
                log.info("request %s: %s on %s (attempt %d)", fields.request_id, retry.reason,
                         backend.backend_id, attempt + 1)
        if last_error is None:
            raise NoBackend(f"no healthy backend serves the model '{fields.model}'")
        raise last_error

    def _defer(self, route_request: RouteRequest, model: str) -> bool:
        """The policy's answer on a fresh snapshot: hold this request in the router?"""
        view = self.view(model, time.monotonic())
        # No backend: False, and the dispatch loop answers "no backend" at once.
        return view is not None and self.policy.defer(route_request, view)

    async def _attempt(
        self,
        request: Request,
        body: bytes,
        fields: RequestFields,
        route_request: RouteRequest,
        backend: Backend,
        decision: Decision,
        started_s: float,
        last: bool,
    ) -> Response | StreamResponse:
        assert self.client is not None, "the app's start-up creates the client"
        ok = False
        with backend_attempt(self.pool, self.metrics, backend, route_request.prompt_tokens,
                             started_s) as slot:
            try:
                try:
                    # The policy's on_dispatched runs once the request's bytes are on their way
                    # (before any suspension: the next decision still sees this one).
                    upstream = await self.client.request(
                        backend.url, request.method,
                        fields.path.encode("utf-8", "surrogateescape"),
                        forward_headers(request.raw_headers, fields.request_id), body,
                        functools.partial(self._dispatched, route_request, decision))
                except HeadTimeout:
                    slot.verdict = False
                    raise Retry(UpstreamTimeout(
                        f"backend {backend.backend_id} did not answer in time"),
                        "timeout") from None
                except (ConnectFailed, ResponseBroken) as exc:
                    slot.verdict = False
                    raise Retry(UpstreamConnectError(
                        f"could not reach backend {backend.backend_id}: {exc}"),
                        "connect") from None
                slot.ttfb.observe(time.monotonic() - started_s)
                with holding_upstream(upstream, self.metrics, slot):
                    status = upstream.status
                    slot.verdict = status < 500
                    if status in RETRY_STATUSES and not last:
                        raise Retry(UpstreamConnectError(
                            f"backend {backend.backend_id} answered {status}"), f"status_{status}")
                    headers = routed_header_lines(
                        upstream.raw_headers, fields.request_id, backend.backend_id,
                        decision.predicted_hit_tokens)
                    response, outcome = await self.relay(
                        request, upstream, headers, backend, fields, decision, route_request)
                    ok = outcome is True and status < 400
                    slot.verdict = None if outcome is None else slot.verdict and outcome
                    self.metrics.count(backend.backend_id, response.status)
                    return response
            finally:
                self.policy.on_finished(route_request, decision, time.monotonic(), ok)
                self.hold.release()

    def _dispatched(self, route_request: RouteRequest, decision: Decision) -> None:
        self.policy.on_dispatched(route_request, decision, time.monotonic())

    def relay(
        self, request: Request, upstream: UpstreamResponse, headers: bytes, backend: Backend,
        fields: RequestFields, decision: Decision, route_request: RouteRequest,
    ) -> Awaitable[tuple[Response | StreamResponse, bool | None]]:
        """Relay the backend's answer to the client: chunk by chunk when it streams, else
        whole. Awaits to (response, True) at a clean end, False when the backend broke it,
        None when the client went away. (A plain function handing back the chosen relay's
        coroutine: no extra coroutine frame per request.)"""
        if fields.stream or upstream.content_type == _SSE:
            return self._relay_stream(request, upstream, headers, backend, route_request,
                                      decision)
        return self._relay_whole(upstream, headers, backend, fields.request_id,
                                 decision.predicted_hit_tokens)

    async def _relay_whole(
        self, upstream: UpstreamResponse, headers: bytes, backend: Backend, request_id: str,
        predicted_hit_tokens: int,
    ) -> tuple[Response, bool]:
        """Read the whole answer, then send it. Returns (response, True), or (a clean 502,
        False) when the backend broke the body."""
        try:
            data = await upstream.read()
        except ResponseBroken as exc:
            # Nothing was written to the client yet, so it gets a clean error instead.
            self.metrics.broken_streams.labels(backend.backend_id).inc()
            error: RouterError = UpstreamConnectError(
                f"backend {backend.backend_id} broke the response: {exc}")
            return error_response(error, routing_headers(request_id, backend.backend_id,
                                                         predicted_hit_tokens)), False
        return Response(status=upstream.status, body=data, headers=headers), True

    async def _relay_stream(
        self,
        request: Request,
        upstream: UpstreamResponse,
        headers: bytes,
        backend: Backend,
        route_request: RouteRequest,
        decision: Decision,
    ) -> tuple[StreamResponse, bool | None]:
        """Relay chunks as they arrive. Returns (response, True) at a clean end, False when
        the backend broke the stream, None when the client went away. The first chunk tells
        the policy the prefill is done (``on_first_token``): vLLM sends nothing before its
        first token, so this is the request's TTFT at the router."""
        response = StreamResponse(status=upstream.status, headers=headers)
        try:
            await response.prepare(request)
            try:
                chunk = await upstream.read_chunk()
                if chunk:
                    if route_request.stream and upstream.status < 400:
                        self.policy.on_first_token(route_request, decision, time.monotonic())
                        # A prefill ended: a held request may have room now (the simulator
                        # asks at every engine output too).
                        self.hold.release()
                    await response.write(chunk)
                    # The rest straight from the backend's socket callback to the client's:
                    # a streamed token then wakes no task (bench/README.md, "Streams relayed
                    # from the socket callback").
                    await upstream.relay(response.write_nowait, response.drain)
            except ResponseBroken as exc:
                self.metrics.broken_streams.labels(backend.backend_id).inc()
                error = UpstreamConnectError(
                    f"backend {backend.backend_id} broke the stream: {exc}")
                if upstream.content_type == _SSE:
                    await response.write(b"data: " + error_body(error) + b"\n\n")
                await response.write_eof()
                return response, False
            await response.write_eof()
        except ConnectionResetError:
            self.metrics.client_disconnects.inc()
            return response, None
        return response, True
