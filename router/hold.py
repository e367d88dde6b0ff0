"""Late binding: requests the policy defers wait in the router, first in first out.

When every backend is saturated, a request sent on anyway sits in an engine's queue with its
backend fixed at arrival, on the cache state of that moment, and an engine that admits
whatever fits preempts when its decodes outgrow KV memory. A request held here instead is
placed when a request finishes and the policy says some backend has room (``Policy.defer``),
with fresh cache state. The simulator holds deferred requests the same way
(``simulator.cluster``).

Order: one queue, first in first out. Only the head asks the policy; when it leaves it wakes
the next, so a release can let several through and no later arrival overtakes a held one.
Bound: a request is held at most ``policy.max_hold_s``, then dispatched anyway (the engine
queues it), so a policy that defers forever cannot starve clients. A client that goes away
while held leaves the queue (its handler is cancelled).

Cost: O(1) per request when nothing is held; one policy query per head wake-up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RouterHold"]

_HOLD_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RouterHold:
    def __init__(self, max_hold_s: float, registry: CollectorRegistry) -> None:
        self.max_hold_s = max_hold_s
        self._queue: deque[asyncio.Event] = deque()
        self.held = Gauge("kvrouter_held_requests",
                          "Requests held in the router because the policy deferred them.",
                          registry=registry)
        self.hold_seconds = Histogram(
            "kvrouter_hold_seconds", "Time a deferred request waited in the router.",
            buckets=_HOLD_BUCKETS_S, registry=registry)
        self.expired = Counter(
            "kvrouter_hold_expired",
            "Held requests dispatched because they reached policy.max_hold_s.", registry=registry)

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    async def wait(self, defer: Callable[[], bool]) -> None:
        """Return when this request may be dispatched: at once unless something is held or
        ``defer()`` says so; else when it heads the queue and ``defer()`` is False, or after
        ``max_hold_s``."""
        if not self._queue and not defer():
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        turn = asyncio.Event()
        queue = self._queue
        queue.append(turn)
        self.held.set(len(queue))
        try:
            while True:
                if queue[0] is turn and not defer():
                    return
                remaining = started + self.max_hold_s - loop.time()
                if remaining <= 0:
                    self.expired.inc()
                    return
                turn.clear()
                try:
                    await asyncio.wait_for(turn.wait(), remaining)
                except TimeoutError:
                    continue
        finally:
            was_head = queue[0] is turn
            queue.remove(turn)
            self.held.set(len(queue))
            self.hold_seconds.observe(loop.time() - started)
            if was_head:
                self.release()

    def release(self) -> None:
        """A request finished or its prefill did (capacity may have freed): the head asks the
        policy again."""
        if self._queue:
            self._queue[0].set()
