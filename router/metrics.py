"""Prometheus metrics of one router app, in the app's own ``CollectorRegistry``.

A per-app registry (not prometheus-client's global one) lets tests and benchmarks run several
routers in one process. Names follow Prometheus conventions with the ``kvrouter_`` prefix.
Other modules add their own metrics to ``RouterMetrics.registry``. Must not import other
``router`` modules except ``router.hot_metrics``.

Routing decisions are counted where the proxy acts on them (not by ``/debug/route``): one
decision per attempt, so a retried request counts once per backend it was sent to. The
predicted hit rate is ``kvrouter_predicted_hit_tokens_total / kvrouter_routed_prompt_tokens_total``
per backend; the backend is the one that prefills (the prefill side of a split decision), where
the policy expected the cached prefix. ``reason`` labels are ``reason_label`` of the policy's
free-text reason: bounded by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from router.hot_metrics import (
    CounterChild,
    GaugeChild,
    HistogramChild,
    HotCounter,
    HotGauge,
    HotHistogram,
)

__all__ = ["MAX_REASON_LABELS", "NO_BACKEND", "RouterMetrics", "reason_label"]

NO_BACKEND = "none"
"""The ``backend`` label of requests answered before any backend was chosen."""

# Router overhead is sub-millisecond and LLM requests run for seconds: cover both ends.
_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
              30.0, 60.0, 120.0, 300.0)


MAX_REASON_LABELS = 32
"""Distinct ``reason`` label values per router; later new ones are counted as ``other``."""
_REASON_CUTS = (",", ";", "(", "<", ">", "=")


def reason_label(reason: str) -> str:
    """The fixed head of a policy's reason: what comes before the first clause separator.

    Policies write ``name: rule`` or ``name:variant`` and may append numbers and backend names
    after a comma, semicolon or parenthesis (``disaggregation: split, prefill on URL ...``);
    only the head goes into a label, so label values stay a short fixed vocabulary.
    """
    end = len(reason)
    for cut in _REASON_CUTS:
        i = reason.find(cut, 0, end)
        if i >= 0:
            end = i
    return reason[:end].strip()[:64] or "none"


class _SpeedFactors:
    """``kvrouter_backend_speed_factor``: read from the policy at each scrape (on the event
    loop, where the policy's state lives)."""

    NAME = "kvrouter_backend_speed_factor"
    HELP = ("How much slower than the fleet the policy has learned each backend computes, from "
            "its first tokens (1: as the fleet; kv_aware prices its work at this factor).")

    def __init__(self, read: Callable[[], Mapping[str, float]]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["backend"])]

    def collect(self) -> list[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["backend"])
        for backend, factor in sorted(self._read().items()):
            family.add_metric([backend], factor)
        return [family]


class RouterMetrics:
    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The per-request families are lock-free (router.hot_metrics); the rest stay
        # prometheus-client's.
        self.requests = HotCounter(
            "kvrouter_requests", "Requests answered, by backend, HTTP status and policy.",
            ["backend", "status", "policy"], r,
        )
        self.duration = HotHistogram(
            "kvrouter_request_duration_seconds", "Time from request received to response end.",
            ["backend"], r, _BUCKETS_S,
        )
        self.ttfb = HotHistogram(
            "kvrouter_time_to_first_byte_seconds",
            "Time from request received to the first upstream response byte.",
            ["backend"], r, _BUCKETS_S,
        )
        self.in_flight = HotGauge(
            "kvrouter_in_flight_requests", "Requests being served, by backend.", ["backend"], r,
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
        self.predicted_hit_tokens = HotCounter(
            "kvrouter_predicted_hit_tokens",
            "Prompt tokens the policy predicted the chosen backend holds cached, per decision.",
            ["backend"], r,
        )
        self.routed_prompt_tokens = HotCounter(
            "kvrouter_routed_prompt_tokens",
            "Prompt tokens of routed requests (estimated without a tokenizer), per decision.",
            ["backend"], r,
        )
        self.decisions = HotCounter(
            "kvrouter_routing_decisions", "Routing decisions acted on, by policy and reason.",
            ["policy", "reason"], r,
        )
        # Label children cached per backend: .labels() is a dict lookup plus a lock each call.
        self._per_backend: dict[str, tuple[GaugeChild, HistogramChild, HistogramChild]] = {}
        self._counts: dict[tuple[str, int], CounterChild] = {}
        self._routed: dict[str, tuple[CounterChild, CounterChild]] = {}
        # Keyed by the reason string itself: policies mostly return the same constant strings,
        # whose hash Python caches, so the common case is one dict lookup.
        self._reasons: dict[str, CounterChild] = {}
        self._reason_labels: dict[str, CounterChild] = {}

    def watch_speed_factors(self, read: Callable[[], Mapping[str, float]]) -> None:
        """Export ``read()`` (backend -> learned speed factor) as
        ``kvrouter_backend_speed_factor{backend}`` at each scrape."""
        self.registry.register(_SpeedFactors(read))

    def for_backend(self, backend: str) -> tuple[GaugeChild, HistogramChild, HistogramChild]:
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

    def routed(self, backend: str, reason: str, prompt_tokens: int,
               predicted_hit_tokens: int) -> None:
        """One routing decision acted on (see the module docstring)."""
        children = self._routed.get(backend)
        if children is None:
            children = self._routed[backend] = (
                self.routed_prompt_tokens.labels(backend),
                self.predicted_hit_tokens.labels(backend),
            )
        children[0].inc(prompt_tokens)
        if predicted_hit_tokens:
            children[1].inc(predicted_hit_tokens)
        child = self._reasons.get(reason)
        if child is None:
            child = self._decision_child(reason)
            if len(self._reasons) < 1024:  # reasons carrying numbers are not worth keeping
                self._reasons[reason] = child
        child.inc()

    def _decision_child(self, reason: str) -> CounterChild:
        label = reason_label(reason)
        child = self._reason_labels.get(label)
        if child is None:
            if len(self._reason_labels) >= MAX_REASON_LABELS:
                label = "other"
                child = self._reason_labels.get(label)
            if child is None:
                child = self._reason_labels[label] = self.decisions.labels(self.policy, label)
        return child
