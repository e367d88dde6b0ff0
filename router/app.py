"""The aiohttp application factory: routes, typed app state, paired start-up and clean-up.

Seams for other modules (all constructor arguments of ``create_app``, never globals):

- ``analyzer``: a ``router.analyzer.RequestAnalyzer`` turning validated request fields into
  the ``RouteRequest``; default ``CharEstimateAnalyzer`` (characters / 4, no block hashes).
  A tokenizing analyzer (exact tokens, block hashes) plugs in here.
- ``index``: the prefix index (``policies.index.PrefixIndex``), put into every
  ``ClusterView.index``; ``None`` when no policy needs one.
- ``background``: factories ``f(state: RouterState) -> coroutine`` started after the upstream
  session exists and cancelled at clean-up (KV-event ingestion, engine metric scraping,
  discovery). A factory reads and writes ``state.pool`` (``router.pool.Backend`` fields such
  as ``engine_waiting_requests``, ``kv_usage_ratio``, ``engine_scraped_at_s``, ``kv_events``),
  feeds ``state.index``, registers its metrics in ``state.metrics.registry`` and may use
  ``state.session()``. Its loop must catch and count its own errors and never swallow
  ``asyncio.CancelledError``.
- ``policy``/``rng``: override the policy built from ``config.policy`` (tests, the simulator's
  parity check).

Proxied requests go through ``state.proxy.client`` (``router.http_client``, a lean HTTP/1.1
keep-alive client); ``state.session()`` is the aiohttp session for everything else (health
checks, background loops). ``serve`` starts the app on a socket with handler cancellation on,
so a client disconnect cancels the upstream request at once. Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from policies.registry import build_policy
from policies.types import ClusterView, Policy, Role
from router.analyzer import CharEstimateAnalyzer, Endpoint, RequestAnalyzer
from router.config import Config
from router.disagg_config import wrap_policy
from router.errors import NoBackend, RouterError, Unauthorized, error_response
from router.health import HealthChecker
from router.http_client import HttpClient
from router.metrics import RouterMetrics
from router.pool import BackendPool
from router.proxy import Proxy
from router.upstream import client_session

__all__ = ["STATE", "BackgroundFactory", "RouterState", "build_pool", "create_app", "serve"]

log = logging.getLogger("kvrouter.app")


@dataclass(frozen=True, slots=True)
class RouterState:
    """Everything one router instance owns; stored under ``app[STATE]``."""

    config: Config
    pool: BackendPool
    policy: Policy
    metrics: RouterMetrics
    proxy: Proxy
    health: HealthChecker
    index: object | None

    def session(self) -> aiohttp.ClientSession:
        """The shared upstream session (exists between start-up and clean-up)."""
        assert self.proxy.session is not None, "the session exists only while the app runs"
        return self.proxy.session


BackgroundFactory = Callable[[RouterState], Coroutine[Any, Any, None]]
STATE = web.AppKey("kvrouter_state", RouterState)
_BACKGROUND = web.AppKey("kvrouter_background", tuple)


def build_pool(config: Config) -> BackendPool:
    pool = BackendPool(
        failure_threshold=config.health.ejection_consecutive_failures,
        open_s=config.health.ejection_s,
        engine_signals_max_age_s=config.server.engine_signals_max_age_s,
    )
    for backend in config.backends:
        pool.add(
            backend.url, role=Role(backend.role), engine=backend.engine,  # type: ignore[arg-type]
            models=backend.models, kv_events_endpoint=backend.kv_events_endpoint,
        )
    return pool


def create_app(
    config: Config,
    *,
    analyzer: RequestAnalyzer | None = None,
    index: object | None = None,
    background: Sequence[BackgroundFactory] = (),
    policy: Policy | None = None,
    rng: random.Random | None = None,
) -> web.Application:
    rng = rng or random.Random(config.policy.seed)
    if policy is None:
        policy = wrap_policy(build_policy(config.policy.name, config.policy.params, rng),
                             config, rng)
    pool = build_pool(config)
    pool.on_removed.append(policy.on_backend_removed)
    metrics = RouterMetrics(policy.name)
    proxy = Proxy(config, pool, policy, analyzer or CharEstimateAnalyzer(), metrics, rng, index)
    health = HealthChecker(pool, config.health, metrics, lambda: state.session())
    state = RouterState(config, pool, policy, metrics, proxy, health, index)

    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[_errors_middleware])
    app[STATE] = state
    app[_BACKGROUND] = tuple(background)
    app.cleanup_ctx.append(_lifecycle)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, Endpoint.COMPLETIONS)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, Endpoint.CHAT)

    async def other(request: web.Request) -> web.StreamResponse:
        return await proxy.handle(request, Endpoint.OTHER)

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/debug/route", _debug_route)
    app.router.add_route("*", "/v1/{tail:.*}", other)
    return app


@web.middleware
async def _errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The boundary: router errors and aiohttp's own HTTP errors leave as OpenAI JSON."""
    try:
        return await handler(request)
    except RouterError as error:
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        http_error = RouterError(exc.reason)
        http_error.status, http_error.code = exc.status, str(exc.status)
        http_error.type = "invalid_request_error"
        return error_response(http_error)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(RouterError("internal router error"))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    up = state.config.upstream
    state.proxy.session = client_session(up)
    state.proxy.client = HttpClient(up.connect_timeout_s, up.first_byte_timeout_s,
                                    up.read_idle_timeout_s)
    tasks = [asyncio.create_task(state.health.run(), name="kvrouter-health")]
    for factory in app[_BACKGROUND]:
        tasks.append(asyncio.create_task(factory(state)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await state.proxy.session.close()
        state.proxy.session = None
        state.proxy.client.close()
        state.proxy.client = None


async def _models(request: web.Request) -> web.Response:
    models = request.app[STATE].pool.healthy_models()
    return web.json_response({"object": "list", "data": list(models.values())})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    healthy = sum(b.healthy for b in request.app[STATE].pool)
    if healthy == 0:
        return error_response(NoBackend("no healthy backend"))
    return web.json_response({"status": "ready", "healthy_backends": healthy})


async def _metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.health.export()
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


async def _debug_route(request: web.Request) -> web.Response:
    """Explain a routing decision without sending the request: candidates, scores, decision."""
    state = request.app[STATE]
    token = state.config.server.admin_token
    if token is not None:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized("a valid admin bearer token is required for /debug/route")
    endpoint = Endpoint.COMPLETIONS
    with contextlib.suppress(ValueError):
        if "messages" in json.loads(await request.read() or b"{}"):
            endpoint = Endpoint.CHAT
    _, fields, route_request = await state.proxy.read_request(request, endpoint, "debug")
    now_s = time.monotonic()
    candidates = state.pool.snapshot(fields.model, now_s)
    if not candidates:
        raise NoBackend(f"no healthy backend serves the model '{fields.model}'")
    decision = state.policy.choose(
        route_request, ClusterView(now_s=now_s, backends=candidates, index=state.index)  # type: ignore[arg-type]
    )
    return web.json_response({
        "policy": state.policy.name,
        "request": _plain(dataclasses.replace(route_request, block_hashes=())) | {
            "block_hashes_count": len(route_request.block_hashes)},
        "candidates": _plain(candidates),
        "decision": _plain(decision),
    })


async def serve(
    app: web.Application, host: str, port: int, *, access_log: bool = False
) -> tuple[web.AppRunner, int]:
    """Start ``app`` on host:port (0 = ephemeral); returns the runner and the bound port."""
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=logging.getLogger("kvrouter.access")
        if access_log else None,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)
