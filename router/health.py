"""Active health checks: each backend's health path on an interval, and model discovery.

A backend turns unhealthy after ``unhealthy_threshold`` consecutive failed checks and healthy
again after ``healthy_threshold`` passes; one that fails its very first check is unhealthy at
once (nothing vouches for it yet). When a backend's models are not configured, the check also
reads its ``/v1/models``, and a healthy backend gets the proxy's idle connections topped up
(``upstream.preconnect``, through ``on_healthy``). Passive ejection (the breaker) lives in the proxy's attempts; this
loop only exports its state. The loop body catches everything but cancellation, counts it and
goes on. Must not import ``router.app`` or ``router.proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from router.config import HealthConfig
from router.metrics import RouterMetrics
from router.pool import Backend, BackendPool

__all__ = ["HealthChecker"]

log = logging.getLogger("kvrouter.health")


class HealthChecker:
    def __init__(
        self,
        pool: BackendPool,
        config: HealthConfig,
        metrics: RouterMetrics,
        session: Callable[[], aiohttp.ClientSession],
        on_healthy: Callable[[Backend], Awaitable[object]] | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self._session = session
        # Runs after each probe that finds a backend healthy (the proxy opens its idle
        # connections there), as a task of its own: a slow connect never delays the round.
        self.on_healthy = on_healthy
        self._warming: set[asyncio.Task[object]] = set()
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.check_all()
                except Exception:
                    self.metrics.loop_errors.labels("health").inc()
                    log.exception("health check round failed")
                await asyncio.sleep(self.config.interval_s)
        finally:  # stopping: no connection is opened behind the app's back
            for task in list(self._warming):
                task.cancel()

    async def check_all(self) -> None:
        backends = list(self.pool)
        await asyncio.gather(*(self.check(b) for b in backends))
        self.export()

    def export(self) -> None:
        healthy = 0
        for backend in self.pool:
            healthy += backend.healthy
            self.metrics.backend_healthy.labels(backend.backend_id).set(int(backend.healthy))
            self.metrics.breaker_state.labels(backend.backend_id).set(backend.breaker.state)
        self.metrics.healthy_backends.set(healthy)

    async def _probe(self, backend: Backend) -> str | None:
        """None when healthy, else why not, in words an operator can act on."""
        url = backend.url + self.config.path
        try:
            async with self._session().get(url, timeout=self._timeout) as response:
                await response.read()
                if response.status == 200:
                    return None
                if response.status == 404:
                    return (f"GET {url} answered 404: wrong path? backends are server roots "
                            f"(http://host:port), health.path is {self.config.path}")
                return f"GET {url} answered HTTP {response.status}"
        except TimeoutError:
            return f"GET {url} timed out after {self.config.timeout_s:g} s (health.timeout_s)"
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error
            if isinstance(cause, ConnectionRefusedError):
                return f"connection refused at {exc.host}:{exc.port}"
            return f"cannot connect to {exc.host}:{exc.port}: {cause.strerror or cause}"
        except aiohttp.ClientError as exc:
            return f"GET {url} failed: {exc.__class__.__name__}: {exc}"

    async def _warm(self, backend: Backend) -> None:
        assert self.on_healthy is not None
        try:
            await self.on_healthy(backend)
        except Exception:
            self.metrics.loop_errors.labels("health").inc()
            log.exception("warming connections to %s failed", backend.backend_id)

    async def _discover_models(self, backend: Backend) -> None:
        try:
            async with self._session().get(
                backend.url + "/v1/models", timeout=self._timeout
            ) as response:
                if response.status != 200:
                    return
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        data = payload.get("data") if isinstance(payload, dict) else None
        if isinstance(data, list):
            backend.discovered_models = {
                entry["id"]: entry
                for entry in data
                if isinstance(entry, dict) and isinstance(entry.get("id"), str)
            }

    async def check(self, backend: Backend) -> None:
        started_s = time.monotonic()
        problem = await self._probe(backend)
        first = backend.health_successes == 0 and backend.health_failures == 0
        if problem is None:
            backend.breaker.on_healthy_probe(started_s)
            backend.health_successes += 1
            backend.health_failures = 0
            if not backend.healthy and backend.health_successes >= self.config.healthy_threshold:
                backend.healthy = True
                log.info("backend %s is healthy again", backend.backend_id)
            if self.config.discover_models and not backend.configured_models:
                await self._discover_models(backend)
            if backend.healthy and self.on_healthy is not None:
                task = asyncio.ensure_future(self._warm(backend))
                self._warming.add(task)
                task.add_done_callback(self._warming.discard)
        else:
            backend.health_failures += 1
            backend.health_successes = 0
            backend.health_problem = problem
            if backend.healthy and (
                first or backend.health_failures >= self.config.unhealthy_threshold
            ):
                backend.healthy = False
                log.warning("backend %s is unhealthy: %s", backend.backend_id, problem)
