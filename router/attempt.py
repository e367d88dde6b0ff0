"""One attempt of a request on one backend: the bookkeeping every attempt shares, whether the
proxy sends it or the prefill/decode path sends its decode leg.

Entering counts the attempt in flight (pool and metric); leaving releases it, observes its
duration and hands the attempt's verdict to the backend's breaker (True: the backend answered
well; False: it failed; None: no verdict, e.g. the client went away). ``routed_headers`` gives
the client the upstream's response headers plus the routing headers. Must not import
``router.proxy`` or ``router.disagg`` (both import this).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict
from prometheus_client import Histogram

from router.metrics import RouterMetrics
from router.pool import Backend, BackendPool
from router.upstream import response_headers

__all__ = ["AttemptSlot", "backend_attempt", "holding_upstream", "routed_headers"]


class Upstream(Protocol):
    """What both upstream clients' responses offer (``router.http_client``, aiohttp)."""

    def close(self) -> None: ...

    def release(self) -> None: ...


@dataclass(slots=True)
class AttemptSlot:
    ttfb: Histogram
    """The backend's time-to-first-byte histogram, observed by the caller when headers come."""
    verdict: bool | None = None


@contextmanager
def backend_attempt(
    pool: BackendPool, metrics: RouterMetrics, backend: Backend, prompt_tokens: int,
    started_s: float,
) -> Iterator[AttemptSlot]:
    pool.acquire(backend.backend_id, prompt_tokens, time.monotonic())
    in_flight, duration, ttfb = metrics.for_backend(backend.backend_id)
    in_flight.inc()
    slot = AttemptSlot(ttfb)
    try:
        yield slot
    finally:
        pool.release(backend, prompt_tokens)
        in_flight.dec()
        now_s = time.monotonic()
        duration.observe(now_s - started_s)
        backend.breaker.record(slot.verdict, now_s)
        if backend.breaker.state:  # closed is the common case; the health loop exports it too
            metrics.breaker_state.labels(backend.backend_id).set(backend.breaker.state)


@contextmanager
def holding_upstream(
    upstream: Upstream, metrics: RouterMetrics, slot: AttemptSlot
) -> Iterator[None]:
    """While the response is relayed: a client that goes away (aiohttp cancels the handler)
    drops the upstream connection at once so the backend stops generating, and leaves no
    verdict; any other failure drops the connection too; the response is always released."""
    try:
        yield
    except asyncio.CancelledError:
        metrics.client_disconnects.inc()
        slot.verdict = None
        upstream.close()
        raise
    except BaseException:
        upstream.close()
        raise
    finally:
        upstream.release()


def routed_headers(
    upstream: Iterable[tuple[str, str]], request_id: str, backend_id: str,
    predicted_hit_tokens: int,
) -> CIMultiDict[str]:
    headers = response_headers(upstream)
    headers["x-request-id"] = request_id
    headers["x-kvrouter-backend"] = backend_id
    headers["x-kvrouter-predicted-hit-tokens"] = str(predicted_hit_tokens)
    return headers
