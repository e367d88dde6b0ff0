"""One attempt of a request on one backend: the bookkeeping every attempt shares, whether the
proxy sends it or the prefill/decode path sends its decode leg.

Entering counts the attempt in flight (pool and metric); leaving releases it, observes its
duration and hands the attempt's verdict to the backend's breaker (True: the backend answered
well; False: it failed; None: no verdict, e.g. the client went away). ``routed_header_lines`` gives
the client the upstream's response headers plus the routing headers. Must not import
``router.proxy`` or ``router.pd.serving`` (both import this).
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Protocol

from router.errors import RouterError
from router.hot_metrics import GaugeChild, HistogramChild
from router.http.upstream import response_header_lines
from router.metrics import RouterMetrics
from router.pool import Backend, BackendPool

__all__ = ["RETRY_STATUSES", "AttemptSlot", "Retry", "backend_attempt", "holding_upstream",
           "routed_header_lines", "routing_headers"]

# Upstream answers that mean "try another backend" (when one is left and nothing was relayed).
RETRY_STATUSES = frozenset({502, 503, 504})


class Retry(Exception):
    """An attempt failed before the first response byte; ``error`` is what the client gets
    if no other backend succeeds, ``reason`` labels the retry metric."""

    def __init__(self, error: RouterError, reason: str) -> None:
        self.error = error
        self.reason = reason

# Both context managers are small classes rather than @contextmanager generators: they run
# on every proxied request, and a generator-based one costs a few microseconds more each.


class Upstream(Protocol):
    """What an upstream response offers (``router.http.client.UpstreamResponse``)."""

    def close(self) -> None: ...

    def release(self) -> None: ...


class AttemptSlot:
    """One attempt in flight; ``verdict`` is set by the caller as the attempt goes."""

    __slots__ = ("_backend", "_duration", "_in_flight", "_metrics", "_pool", "_prompt_tokens",
                 "_started_s", "ttfb", "verdict")

    def __init__(self, pool: BackendPool, metrics: RouterMetrics, backend: Backend,
                 prompt_tokens: int, started_s: float) -> None:
        self._pool = pool
        self._metrics = metrics
        self._backend = backend
        self._prompt_tokens = prompt_tokens
        self._started_s = started_s
        in_flight, duration, ttfb = metrics.for_backend(backend.backend_id)
        self._in_flight: GaugeChild = in_flight
        self._duration: HistogramChild = duration
        self.ttfb: HistogramChild = ttfb
        """The backend's time-to-first-byte histogram, observed by the caller when headers
        come."""
        self.verdict: bool | None = None

    def __enter__(self) -> AttemptSlot:
        backend = self._backend
        self._pool.acquire(backend.backend_id, self._prompt_tokens, time.monotonic())
        self._in_flight.inc()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        backend = self._backend
        self._pool.release(backend, self._prompt_tokens)
        self._in_flight.dec()
        now_s = time.monotonic()
        self._duration.observe(now_s - self._started_s)
        backend.breaker.record(self.verdict, now_s)
        if backend.breaker.state:  # closed is the common case; the health loop exports it too
            self._metrics.breaker_state.labels(backend.backend_id).set(backend.breaker.state)


def backend_attempt(
    pool: BackendPool, metrics: RouterMetrics, backend: Backend, prompt_tokens: int,
    started_s: float,
) -> AttemptSlot:
    """``with backend_attempt(...) as slot:`` counts the attempt in flight while it runs."""
    return AttemptSlot(pool, metrics, backend, prompt_tokens, started_s)


class holding_upstream:
    """While the response is relayed: a client that goes away (the server cancels the
    handler) drops the upstream connection at once so the backend stops generating, and
    leaves no verdict; any other failure drops the connection too; the response is always
    released."""

    __slots__ = ("_metrics", "_slot", "_upstream")

    def __init__(self, upstream: Upstream, metrics: RouterMetrics, slot: AttemptSlot) -> None:
        self._upstream = upstream
        self._metrics = metrics
        self._slot = slot

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        upstream = self._upstream
        try:
            if exc_type is None:
                return
            if issubclass(exc_type, asyncio.CancelledError):
                self._metrics.client_disconnects.inc()
                self._slot.verdict = None
            upstream.close()
        finally:
            upstream.release()


def routing_headers(request_id: str, backend_id: str,
                    predicted_hit_tokens: int) -> list[tuple[str, str]]:
    """The headers the router adds to every routed answer."""
    return [("x-request-id", request_id), ("x-kvrouter-backend", backend_id),
            ("x-kvrouter-predicted-hit-tokens", str(predicted_hit_tokens))]


def routed_header_lines(
    raw: list[tuple[bytes, bytes]], request_id: str, backend_id: str,
    predicted_hit_tokens: int,
) -> bytes:
    """The upstream's response headers as received (bytes; hop-by-hop ones and any routing
    header it sent dropped) plus the routing headers, as ready header lines: they reach the
    client without being decoded and encoded again."""
    return response_header_lines(raw) + b"x-request-id: %b\r\nx-kvrouter-backend: %b\r\n" \
        b"x-kvrouter-predicted-hit-tokens: %d\r\n" % (
            request_id.encode("latin-1"), backend_id.encode("latin-1"), predicted_hit_tokens)
