"""Prometheus metrics of one router app, in the app's own ``CollectorRegistry``.

A per-app registry (not prometheus-client's global one) lets tests and benchmarks run several
routers in one process. Names follow Prometheus conventions with the ``kvrouter_`` prefix.
Other modules add their own metrics to ``RouterMetrics.registry``. Must not import other
``router`` modules.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["NO_BACKEND", "RouterMetrics"]

NO_BACKEND = "none"
"""The ``backend`` label of requests answered before any backend was chosen."""

# Router overhead is sub-millisecond and LLM requests run for seconds: cover both ends.
_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
              30.0, 60.0, 120.0, 300.0)


class RouterMetrics:
    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvrouter_requests", "Requests answered, by backend, HTTP status and policy.",
            ["backend", "status", "policy"], registry=r,
        )
        self.duration = Histogram(
            "kvrouter_request_duration_seconds", "Time from request received to response end.",
            ["backend"], buckets=_BUCKETS_S, registry=r,
        )
        self.ttfb = Histogram(
            "kvrouter_time_to_first_byte_seconds",
            "Time from request received to the first upstream response byte.",
            ["backend"], buckets=_BUCKETS_S, registry=r,
        )
        self.in_flight = Gauge(
            "kvrouter_in_flight_requests", "Requests being served, by backend.", ["backend"],
            registry=r,
        )
        self.retries = Counter(
            "kvrouter_retries", "Attempts retried on another backend, by reason.", ["reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "kvrouter_breaker_state", "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
            ["backend"], registry=r,
        )
        self.backend_healthy = Gauge(
            "kvrouter_backend_healthy", "1 when the backend passes active health checks.",
            ["backend"], registry=r,
        )
        self.healthy_backends = Gauge(
            "kvrouter_healthy_backends", "Backends passing active health checks.", registry=r,
        )
        self.broken_streams = Counter(
            "kvrouter_broken_streams", "Responses cut off after the first byte, by backend.",
            ["backend"], registry=r,
        )
        self.client_disconnects = Counter(
            "kvrouter_client_disconnects", "Requests whose client went away before the end.",
            registry=r,
        )
        self.loop_errors = Counter(
            "kvrouter_background_errors", "Errors caught in background loops, by loop.",
            ["loop"], registry=r,
        )
        # Label children cached per backend: .labels() is a dict lookup plus a lock each call.
        self._per_backend: dict[str, tuple[Gauge, Histogram, Histogram]] = {}
        self._counts: dict[tuple[str, int], Counter] = {}

    def for_backend(self, backend: str) -> tuple[Gauge, Histogram, Histogram]:
        """(in-flight gauge, duration histogram, ttfb histogram) for one backend."""
        children = self._per_backend.get(backend)
        if children is None:
            children = (
                self.in_flight.labels(backend),
                self.duration.labels(backend),
                self.ttfb.labels(backend),
            )
            self._per_backend[backend] = children
        return children

    def count(self, backend: str, status: int) -> None:
        child = self._counts.get((backend, status))
        if child is None:
            child = self._counts[(backend, status)] = self.requests.labels(
                backend, str(status), self.policy)
        child.inc()
