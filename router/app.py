"""The router application: routes, its state, paired start-up and clean-up, and ``serve``.

Seams for other modules (all constructor arguments of ``create_app``, never globals):

- ``analyzer``: a ``router.prompt.analyzer.RequestAnalyzer`` turning validated request fields into
  the ``RouteRequest``; default ``CharEstimateAnalyzer`` (characters / 4, no block hashes).
  A tokenizing analyzer (exact tokens, block hashes) plugs in here.
- ``index``: the prefix index (``policies.kv.index.PrefixIndex``), put into every
  ``ClusterView.index``; ``None`` when no policy needs one.
- ``background``: factories ``f(state: RouterState) -> coroutine`` started after the upstream
  session exists and cancelled at clean-up (KV-event ingestion, engine metric scraping,
  discovery). A factory reads and writes ``state.pool`` (``router.pool.Backend`` fields such
  as ``signals`` and ``scraped_at_s`` (via ``Backend.scraped``), ``kv_events``),
  feeds ``state.index``, registers its metrics in ``state.metrics.registry`` and may use
  ``state.session()``. Its loop must catch and count its own errors and never swallow
  ``asyncio.CancelledError``.
- ``policy``/``rng``: override the policy built from ``config.policy`` (tests, the simulator's
  parity check).
- ``routes``/``ready_checks``: more routes (path -> method -> handler; the KV plumbing's
  ``/admin/index/snapshot``) and callables saying why ``/ready`` must answer 503 yet (warm
  start), or None.

Proxied requests go through ``state.proxy.client`` (``router.http.client``, a lean HTTP/1.1
keep-alive client); ``state.session()`` is the aiohttp session for everything else (health
checks, background loops). ``serve`` starts the app's background work, then listens with
``router.http.server`` (a client disconnect cancels its request's handler, and with it the
upstream request). Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from policies.base import backend_speed_factors
from policies.kv.index import PrefixIndex
from policies.registry import build_policy
from policies.types import Policy
from router.config import Config
from router.config.disaggregation import wrap_policy
from router.errors import NoBackend, RouterError, error_response, http_error, require_admin
from router.health import HealthChecker
from router.http.client import HttpClient
from router.http.messages import (
    BodyTooLarge,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from router.http.server import HttpServer
from router.http.upstream import client_session
from router.metrics import RouterMetrics
from router.pool import BackendPool
from router.prompt.analyzer import CharEstimateAnalyzer, Endpoint, RequestAnalyzer
from router.proxy import Proxy, parse_json
from router.sync.service import SyncService, build_sync

__all__ = ["App", "BackgroundFactory", "RouterState", "Runner", "build_pool", "create_app",
           "serve"]

log = logging.getLogger("kvrouter.app")


@dataclass(frozen=True, slots=True)
class RouterState:
    """Everything one router instance owns; ``App.state``."""

    config: Config
    pool: BackendPool
    policy: Policy
    metrics: RouterMetrics
    proxy: Proxy
    health: HealthChecker
    index: PrefixIndex | None

    def session(self) -> aiohttp.ClientSession:
        """The shared upstream session (exists between start-up and clean-up)."""
        assert self.proxy.session is not None, "the session exists only while the app runs"
        return self.proxy.session


BackgroundFactory = Callable[[RouterState], Coroutine[Any, Any, None]]
_Route = Callable[[Request], Awaitable[Response | StreamResponse]]


def build_pool(config: Config) -> BackendPool:
    pool = BackendPool(
        failure_threshold=config.health.ejection_consecutive_failures,
        open_s=config.health.ejection_s,
        engine_signals_max_age_s=config.server.engine_signals_max_age_s,
    )
    for backend in config.backends:
        pool.add(
            backend.url, role=backend.role, engine=backend.engine,
            models=backend.models, kv_events_endpoint=backend.kv_events_endpoint,
        )
    return pool


class App:
    """The routes over one ``RouterState``, and its background work (``start``/``stop``)."""

    def __init__(self, state: RouterState, background: Sequence[BackgroundFactory]) -> None:
        self.state = state
        self._background = tuple(background)
        self._tasks: list[asyncio.Task[None]] = []
        self.ready_checks: list[Callable[[], str | None]] = []
        """Each says why the router is not ready yet (e.g. warm start), or None."""
        proxy = state.proxy
        # partial, not a wrapping coroutine: one coroutine frame less per proxied request.
        self.other: _Route = functools.partial(proxy.handle, endpoint=Endpoint.OTHER)
        # path -> method -> handler; any other /v1/ path goes to a backend as is.
        self.routes: dict[str, dict[str, _Route]] = {
            "/v1/completions": {
                "POST": functools.partial(proxy.handle, endpoint=Endpoint.COMPLETIONS)},
            "/v1/chat/completions": {
                "POST": functools.partial(proxy.handle, endpoint=Endpoint.CHAT)},
            "/v1/models": {"GET": self._models, "HEAD": self._models},
            "/health": {"GET": self._health, "HEAD": self._health},
            "/ready": {"GET": self._ready, "HEAD": self._ready},
            "/metrics": {"GET": self._metrics, "HEAD": self._metrics},
            "/debug/route": {"POST": self._debug_route},
        }

    async def handle(self, request: Request) -> Response | StreamResponse:
        """The boundary: every router error leaves as OpenAI JSON."""
        try:
            methods = self.routes.get(request.path)
            if methods is None:
                if request.path.startswith("/v1/"):
                    return await self.other(request)
                raise http_error(404, "Not Found")
            route = methods.get(request.method)
            if route is None:
                return error_response(http_error(405, "Method Not Allowed"),
                                      {"Allow": ", ".join(methods),
                                       "x-request-id": self.request_id(request)})
            return await route(request)
        except RouterError as error:
            return error_response(error, {"x-request-id": self.request_id(request)})
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(RouterError("internal router error"),
                                  {"x-request-id": self.request_id(request)})

    def request_id(self, request: Request | None) -> str:
        """The client's ``x-request-id``, else a new one: every answer the router makes itself
        (errors of every status, ``/v1/models``, health, metrics) carries one, so a client can
        quote it and an operator find it in the logs."""
        given = request.headers.get("x-request-id") if request is not None else None
        return given or self.state.proxy.new_request_id()

    def error_body(self, status: int, message: str, request: Request | None) -> Response:
        """The HTTP server's own errors (bad framing, too-large heads, timeouts)."""
        return error_response(http_error(status, message),
                              {"x-request-id": self.request_id(request)})

    async def start(self) -> None:
        state = self.state
        up = state.config.upstream
        state.proxy.session = client_session(up)
        state.proxy.client = HttpClient(up.connect_timeout_s, up.first_byte_timeout_s,
                                        up.read_idle_timeout_s,
                                        max_connections=up.max_connections)
        self._tasks = [asyncio.create_task(state.health.run(), name="kvrouter-health")]
        for factory in self._background:
            self._tasks.append(asyncio.create_task(factory(state)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        state = self.state
        if state.proxy.session is not None:
            await state.proxy.session.close()
            state.proxy.session = None
        if state.proxy.client is not None:
            state.proxy.client.close()
            state.proxy.client = None

    async def _models(self, request: Request) -> Response:
        models = self.state.pool.healthy_models()
        return json_response({"object": "list", "data": list(models.values())},
                             headers={"x-request-id": self.request_id(request)})

    async def _health(self, request: Request) -> Response:
        return json_response({"status": "ok"}, headers={"x-request-id": self.request_id(request)})

    async def _ready(self, request: Request) -> Response:
        healthy = sum(b.healthy for b in self.state.pool)
        if healthy == 0:
            return error_response(NoBackend("no healthy backend"),
                                  {"x-request-id": self.request_id(request)})
        for check in self.ready_checks:
            problem = check()
            if problem is not None:
                return error_response(http_error(503, problem),
                                      {"x-request-id": self.request_id(request)})
        return json_response({"status": "ready", "healthy_backends": healthy},
                             headers={"x-request-id": self.request_id(request)})

    def local_metrics(self) -> bytes:
        """This process's own exposition (``serve --workers`` merges its siblings')."""
        self.state.health.export()
        return generate_latest(self.state.metrics.registry)

    async def _metrics(self, request: Request) -> Response:
        return Response(body=self.local_metrics(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST,
                                 "x-request-id": self.request_id(request)})

    async def _debug_route(self, request: Request) -> Response:
        """Explain a routing decision without sending the request: candidates, scores,
        decision."""
        state = self.state
        require_admin(request, state.config.server.admin_token, "/debug/route",
                      open_without=True)
        endpoint = Endpoint.COMPLETIONS
        with contextlib.suppress(ValueError, RecursionError, BodyTooLarge):  # read_request
            parsed = parse_json(await request.read() or b"{}")               # answers these
            if isinstance(parsed, dict) and "messages" in parsed:
                endpoint = Endpoint.CHAT
        _, fields, route_request = await state.proxy.read_request(request, endpoint, "debug")
        view = state.proxy.view(fields.model, time.monotonic())
        if view is None:
            raise NoBackend(f"no healthy backend serves the model '{fields.model}'")
        decision = state.proxy.decide(route_request, view)
        return json_response({
            "policy": state.policy.name,
            "request": _plain(dataclasses.replace(route_request, block_hashes=())) | {
                "block_hashes_count": len(route_request.block_hashes)},
            "candidates": _plain(view.backends),
            "decision": _plain(decision),
            "index": _index_tiers(state.index, route_request.block_hashes, view.now_s),
        }, headers={"x-request-id": self.request_id(request)})


def create_app(
    config: Config,
    *,
    analyzer: RequestAnalyzer | None = None,
    index: PrefixIndex | None = None,
    background: Sequence[BackgroundFactory] = (),
    policy: Policy | None = None,
    rng: random.Random | None = None,
    sync: SyncService | None = None,
    routes: Mapping[str, Mapping[str, _Route]] | None = None,
    ready_checks: Sequence[Callable[[], str | None]] = (),
) -> App:
    rng = rng or random.Random(config.policy.seed)
    if policy is None:
        policy = wrap_policy(build_policy(config.policy.name, config.policy.params, rng),
                             config.disaggregation, rng)
    # Replica sync (``sync:``): the policy sees peers' in-flight work and publishes its own.
    sync = sync or build_sync(config, {})
    if sync is not None:
        policy = sync.wrap(policy)
        background = [*background, sync.run]
    pool = build_pool(config)
    pool.on_removed.append(policy.on_backend_removed)
    metrics = RouterMetrics(policy.name)
    metrics.watch_speed_factors(lambda: backend_speed_factors(policy, time.monotonic()))
    proxy = Proxy(config, pool, policy, analyzer or CharEstimateAnalyzer(), metrics, rng, index)
    if sync is not None:
        # A held request waits for capacity to free up; a peer's finishes free it too, and
        # are heard only as its next state (policies.replica_sync).
        sync.on_peer_state = proxy.hold.release
    health = HealthChecker(pool, config.health, metrics, lambda: state.session(),
                           on_healthy=proxy.preconnect if config.upstream.preconnect else None)
    state = RouterState(config, pool, policy, metrics, proxy, health, index)
    app = App(state, background)
    for path, methods in (routes or {}).items():  # e.g. the KV plumbing's admin endpoints
        app.routes[path] = dict(methods)
    app.ready_checks.extend(ready_checks)
    return app


def _index_tiers(index: object | None, block_hashes: tuple[int, ...], now_s: float) -> Any:
    """What the event-fed index holds of this prompt, per backend and tier (GPU, CPU offload,
    own storage, the fleet-shared store), and the leading blocks the shared store holds."""
    if not isinstance(index, PrefixIndex) or not block_hashes:
        return None
    return {
        "blocks": len(block_hashes),
        "shared_prefix_blocks": index.shared_prefix(block_hashes),
        "backends": _plain(index.match(block_hashes, now_s)),
    }


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclass(slots=True)
class Runner:
    """A serving app: ``cleanup`` stops listening, lets in-flight requests finish (up to
    ``grace_s``), then stops the app's background work."""

    app: App
    server: HttpServer

    async def cleanup(self, grace_s: float = 60.0) -> None:
        await self.server.close(grace_s)
        await self.app.stop()


async def serve(
    app: App, host: str, port: int, *, access_log: bool = False, reuse_port: bool = False
) -> tuple[Runner, int]:
    """Start ``app`` on host:port (0 = ephemeral); returns the runner and the bound port."""
    config = app.state.config.server
    server = HttpServer(
        app.handle, app.error_body, max_body_bytes=config.max_body_bytes,
        body_timeout_s=config.body_timeout_s,
        max_buffered_body_bytes=config.max_buffered_body_bytes,
        access_log=logging.getLogger("kvrouter.access") if access_log else None)
    await app.start()
    try:
        bound = await server.start(host, port, reuse_port=reuse_port)
    except BaseException:
        await app.stop()
        raise
    return Runner(app, server), bound
