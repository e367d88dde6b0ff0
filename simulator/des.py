"""A minimal discrete-event loop in virtual time (SimPy / Vidur style, without coroutines).

Events are ``(time_s, seq, callback, args)`` in a heap. ``seq`` is a per-loop counter, so events
due at the same instant run in the order they were scheduled: a run is a pure function of its
inputs, never of hash order or wall time. Callbacks schedule further events with ``at`` /
``after``. Pure and synchronous: must not import ``router``, asyncio, or read a clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

__all__ = ["EventLoop"]


class EventLoop:
    """Runs callbacks in (time, scheduling order). ``now_s`` is the current event's time."""

    __slots__ = ("_heap", "_seq", "events_run", "now_s")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0
        self.now_s = 0.0
        self.events_run = 0

    def at(self, time_s: float, callback: Callable[..., Any], *args: Any) -> None:
        """Schedule ``callback(*args)`` at ``time_s`` (clamped to now: no going back in time)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(time_s, self.now_s), self._seq, callback, args))

    def after(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> None:
        self.at(self.now_s + delay_s, callback, *args)

    def __len__(self) -> int:
        return len(self._heap)

    def next_time_s(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run_next(self) -> None:
        """Run the one next event (for drivers that interleave their own work between events)."""
        time_s, _seq, callback, args = heapq.heappop(self._heap)
        self.now_s = time_s
        self.events_run += 1
        callback(*args)

    def run(self, until_s: float = float("inf"), stop: Callable[[], bool] | None = None) -> None:
        """Run events due at or before ``until_s``; ``stop()`` is checked after each event."""
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= until_s:
            time_s, _seq, callback, args = pop(heap)
            self.now_s = time_s
            self.events_run += 1
            callback(*args)
            if stop is not None and stop():
                return
        if until_s != float("inf"):
            self.now_s = max(self.now_s, until_s)
