"""The backend pool: every known backend and its live state, and candidate snapshots.

Written by the proxy (in-flight counts, breaker verdicts), the health loop (healthy, models)
and the engine-metrics scrape loop (``Backend.scraped``). Read by ``snapshot(model, now_s)``,
which turns the eligible backends into the frozen ``BackendState`` values policies see. The
per-backend counters and the state built from them are ``policies.bookkeeping``'s, shared with
the simulator. Discovery adds
and removes backends with ``add``/``remove``; ``on_removed`` callbacks (the policy's
``on_backend_removed``, the prefix index) run on removal.

One event loop owns the pool, so it has no locks. Must not import aiohttp or other ``router``
modules except ``router.breaker``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from policies.bookkeeping import BackendLoad
from policies.types import BackendId, BackendState, EngineKind, Role
from router.breaker import Breaker

__all__ = ["Backend", "BackendPool"]


@dataclass(slots=True, eq=False, kw_only=True)
class Backend(BackendLoad):
    """One serving engine: its live load (``policies.bookkeeping.BackendLoad``: in flight,
    engine signals, KV events) plus what only the live router knows of it."""

    url: str
    breaker: Breaker
    configured_models: tuple[str, ...] = ()
    kv_events_endpoint: str | None = None
    # Models the health loop read from the backend's /v1/models (raw OpenAI entries by id).
    discovered_models: dict[str, dict[str, Any]] = field(default_factory=dict)
    healthy: bool = True
    health_successes: int = 0
    health_failures: int = 0
    # Why the last failed health check failed (status, refused, timeout), for log lines.
    health_problem: str = ""

    def models(self) -> tuple[str, ...]:
        """Configured models win; else discovered ones; empty means unknown (serves any)."""
        return self.configured_models or tuple(self.discovered_models)

    def serves(self, model: str) -> bool:
        # Same answer as ``not models() or not model or model in models()``, without building
        # the tuple of discovered models: this runs for every backend on every request.
        if not model:
            return True
        if self.configured_models:
            return model in self.configured_models
        return not self.discovered_models or model in self.discovered_models


class BackendPool:
    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_s: float = 30.0,
        engine_signals_max_age_s: float = 15.0,
    ) -> None:
        self._backends: dict[BackendId, Backend] = {}
        self._failure_threshold = failure_threshold
        self._open_s = open_s
        self._max_age_s = engine_signals_max_age_s
        self.on_removed: list[Callable[[BackendId], None]] = []

    def add(
        self,
        url: str,
        *,
        role: Role = Role.MIXED,
        engine: EngineKind = EngineKind.VLLM,
        models: Iterable[str] = (),
        kv_events_endpoint: str | None = None,
        healthy: bool = True,
    ) -> Backend:
        """Add (or return the existing) backend; its id is its base URL without a final '/'."""
        url = url.rstrip("/")
        existing = self._backends.get(url)
        if existing is not None:
            return existing
        backend = Backend(
            backend_id=url,
            url=url,
            role=role,
            engine=engine,
            breaker=Breaker(self._failure_threshold, self._open_s),
            configured_models=tuple(models),
            kv_events_endpoint=kv_events_endpoint,
            healthy=healthy,
        )
        self._backends[url] = backend
        return backend

    def remove(self, backend_id: BackendId) -> None:
        if self._backends.pop(backend_id, None) is not None:
            for callback in self.on_removed:
                callback(backend_id)

    def get(self, backend_id: BackendId) -> Backend | None:
        return self._backends.get(backend_id)

    def __iter__(self) -> Any:
        return iter(list(self._backends.values()))

    def __len__(self) -> int:
        return len(self._backends)

    def knows_model(self, model: str) -> bool:
        """False only when every backend lists its models and none lists this one (an empty
        pool knows nothing, so the request gets 503 rather than 404)."""
        if not self._backends:
            return True
        for backend in self._backends.values():  # a loop, not any(): runs on every request
            if backend.serves(model):
                return True
        return False

    def healthy_models(self) -> dict[str, dict[str, Any]]:
        """The union of models served by healthy backends, as OpenAI model entries."""
        union: dict[str, dict[str, Any]] = {}
        for backend in self._backends.values():
            if not backend.healthy:
                continue
            for model in backend.models():
                entry = backend.discovered_models.get(model)
                union.setdefault(model, entry or {"id": model, "object": "model",
                                                  "owned_by": "kvrouter"})
        return union

    def snapshot(
        self,
        model: str,
        now_s: float,
        exclude: Iterable[BackendId] = (),
        roles: frozenset[Role] | None = None,
    ) -> tuple[BackendState, ...]:
        """Eligible candidates (healthy, breaker allows, serves ``model``) in a stable order."""
        excluded = set(exclude) if exclude else ()
        max_age_s = self._max_age_s
        states = []
        for backend in self._backends.values():
            if (
                not backend.healthy
                or (excluded and backend.backend_id in excluded)
                or (roles is not None and backend.role not in roles)
                or not backend.serves(model)
                or not backend.breaker.allows(now_s)
            ):
                continue
            states.append(backend.state(now_s, max_age_s))
        return tuple(states)

    def acquire(self, backend_id: BackendId, prompt_tokens: int, now_s: float) -> Backend:
        backend = self._backends[backend_id]
        backend.acquire(prompt_tokens)
        backend.breaker.on_dispatch(now_s)
        return backend

    @staticmethod
    def release(backend: Backend, prompt_tokens: int) -> None:
        # The backend may have been removed meanwhile; its object still balances its counters.
        backend.release(prompt_tokens)
