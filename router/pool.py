"""The backend pool: every known backend and its live state, and candidate snapshots.

Written by the proxy (in-flight counts, breaker verdicts), the health loop (healthy, models)
and the engine-metrics scrape loop (``engine_*``, ``kv_usage_ratio``, ``total_kv_blocks``,
``block_size``, stamped with ``engine_scraped_at_s``). Read by ``snapshot(model, now_s)``, which
turns the eligible backends into the frozen ``BackendState`` values policies see. Discovery adds
and removes backends with ``add``/``remove``; ``on_removed`` callbacks (the policy's
``on_backend_removed``, the prefix index) run on removal.

One event loop owns the pool, so it has no locks. Must not import aiohttp or other ``router``
modules except ``router.breaker``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from policies.types import BackendId, BackendState, EngineKind, Role
from router.breaker import Breaker

__all__ = ["Backend", "BackendPool"]


@dataclass(slots=True, eq=False)
class Backend:
    """One serving engine and its mutable live state (the pool's, not a policy's, view)."""

    backend_id: BackendId
    url: str
    role: Role
    engine: EngineKind
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
    in_flight_requests: int = 0
    in_flight_prompt_tokens: int = 0
    # Set by the engine-metrics scrape loop; ignored once older than the pool's max age.
    engine_waiting_requests: int | None = None
    engine_running_requests: int | None = None
    kv_usage_ratio: float | None = None
    total_kv_blocks: int | None = None
    block_size: int | None = None
    engine_scraped_at_s: float | None = None
    # True once KV events from this backend feed the prefix index (set by the ingestion loop).
    kv_events: bool = False

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
            fresh = (
                backend.engine_scraped_at_s is not None
                and now_s - backend.engine_scraped_at_s <= self._max_age_s
            )
            states.append(
                BackendState(
                    backend_id=backend.backend_id,
                    role=backend.role,
                    engine=backend.engine,
                    healthy=True,
                    in_flight_requests=backend.in_flight_requests,
                    in_flight_prompt_tokens=backend.in_flight_prompt_tokens,
                    engine_waiting_requests=backend.engine_waiting_requests if fresh else None,
                    engine_running_requests=backend.engine_running_requests if fresh else None,
                    kv_usage_ratio=backend.kv_usage_ratio if fresh else None,
                    total_kv_blocks=backend.total_kv_blocks if fresh else None,
                    kv_events=backend.kv_events,
                )
            )
        return tuple(states)

    def acquire(self, backend_id: BackendId, prompt_tokens: int, now_s: float) -> Backend:
        backend = self._backends[backend_id]
        backend.in_flight_requests += 1
        backend.in_flight_prompt_tokens += prompt_tokens
        backend.breaker.on_dispatch(now_s)
        return backend

    @staticmethod
    def release(backend: Backend, prompt_tokens: int) -> None:
        # The backend may have been removed meanwhile; its object still balances its counters.
        backend.in_flight_requests -= 1
        backend.in_flight_prompt_tokens -= prompt_tokens
