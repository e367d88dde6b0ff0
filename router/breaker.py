"""A per-backend circuit breaker for passive outlier ejection.

closed --(N consecutive failures)--> open --(after open_s)--> half_open
open --(a health check started after it opened passes)--> half_open
half_open --(probe succeeds)--> closed;  half_open --(probe fails)--> open again

While open the backend gets no requests; once ``open_s`` has passed, exactly one request at a
time is let through as a probe. Time is passed in (``now_s`` from ``time.monotonic``) so the
state machine is testable without sleeping. Must not import other ``router`` modules.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Breaker", "BreakerState"]


class BreakerState(IntEnum):
    # Values are what the kvrouter_breaker_state gauge exports.
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    __slots__ = ("_opened_at_s", "_probe_in_flight", "consecutive_failures", "failure_threshold",
                 "open_s", "state")

    def __init__(self, failure_threshold: int, open_s: float) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._opened_at_s = 0.0
        self._probe_in_flight = False

    def allows(self, now_s: float) -> bool:
        """Whether the backend may be offered to a policy now (does not change state)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now_s - self._opened_at_s >= self.open_s
        return not self._probe_in_flight

    def on_dispatch(self, now_s: float) -> None:
        """A request was sent; past the open period it becomes the half-open probe."""
        if self.state is BreakerState.OPEN and now_s - self._opened_at_s >= self.open_s:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            self._probe_in_flight = True

    def on_healthy_probe(self, probe_started_s: float) -> None:
        """An active health check that began at ``probe_started_s`` passed. A check begun
        after the ejection has seen the backend answer since it failed (a restarted pod is
        typically healthy long before ``open_s`` is over): let one request try it now."""
        if self.state is BreakerState.OPEN and probe_started_s >= self._opened_at_s:
            self.state = BreakerState.HALF_OPEN
            self._probe_in_flight = False

    def on_success(self) -> None:
        self.consecutive_failures = 0
        self._probe_in_flight = False
        self.state = BreakerState.CLOSED

    def on_failure(self, now_s: float) -> None:
        self.consecutive_failures += 1
        self._probe_in_flight = False
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED
            and self.consecutive_failures >= self.failure_threshold
        ):
            self.state = BreakerState.OPEN
            self._opened_at_s = now_s

    def record(self, verdict: bool | None, now_s: float) -> None:
        """One attempt's verdict: True passed, False failed, None ended without one."""
        if verdict is True:
            self.on_success()
        elif verdict is False:
            self.on_failure(now_s)
        else:
            self.on_abandoned()

    def on_abandoned(self) -> None:
        """The request ended without a verdict (client went away): free the probe slot."""
        self._probe_in_flight = False
