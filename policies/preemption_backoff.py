"""Each backend's KV hold ratio, backed off while its engine preempts: additive increase,
multiplicative decrease on the engine's own preemption counter.

kv_aware holds a request in the router while no backend has KV room for it within a share of
its KV memory (``hold_kv_ratio``). A high share keeps the median low where the engines keep up
and admits work that will be preempted where they do not; a low one does the reverse
(docs/simulation.md, "Late binding's KV ratio"). An engine says which case it is in:
``vllm:num_preemptions_total`` rises only while it is over-committed and recomputing work.

Per backend, from the counter as the scrapes report it (``BackendState.engine_preemptions_total``):

    on a view that shows the counter above the last one seen (or, after it went down, an engine
    restart, any count since): ratio = max(floor_ratio, ratio_now * backoff_ratio), at now_s
    otherwise:  ratio_now = min(ceiling_ratio, ratio + (ceiling_ratio - floor_ratio)
                                              * (now_s - then_s) / recovery_s)

The first value seen for a backend is only a baseline (a router that starts beside a running
engine does not know when those preemptions happened); an unknown or stale counter (``None``)
changes nothing. A backend that never preempts is held at ``ceiling_ratio`` exactly, so where
no engine preempts the hold is what it was without this. ``backoff_ratio`` 1 or
``recovery_s`` 0 turns it off. The counter is scraped, so a rise is seen at the first hold
decision after the scrape that shows it, in the router and the simulator alike.

kv_aware holds by the lowest of its candidates' ratios (its docstring has why, and the
figures: mixed 20/s at 6 engines, where a fixed 0.9 spent more prefill and preempted more than
sglang_cache_aware, now spends less than it, with fewer preemptions and a lower TTFT p99).

Pure: ``now_s`` comes from the caller. Cost: O(1) per backend per observation. Must not import
anything outside the standard library and ``policies.types``.
"""

from __future__ import annotations

from policies.types import BackendId, BackendState

__all__ = ["PreemptionBackoff"]


class PreemptionBackoff:
    """Per-backend hold ratios between ``floor_ratio`` and ``ceiling_ratio``."""

    def __init__(self, ceiling_ratio: float, floor_ratio: float, backoff_ratio: float,
                 recovery_s: float) -> None:
        self.ceiling_ratio = ceiling_ratio
        self.floor_ratio = min(floor_ratio, ceiling_ratio)
        self.backoff_ratio = backoff_ratio
        self.recovery_s = recovery_s
        self._seen: dict[BackendId, int] = {}  # the last counter value seen per backend
        self._low: dict[BackendId, tuple[float, float]] = {}  # backed-off ratio, since when

    @property
    def enabled(self) -> bool:
        return self.backoff_ratio < 1.0 and self.recovery_s > 0 and self.ceiling_ratio > 0

    def observe(self, backend: BackendState, now_s: float) -> None:
        """Note ``backend``'s counter; back its ratio off if the counter rose since last seen.
        Seeing the same value again changes nothing, so repeated calls on one view are one."""
        total = backend.engine_preemptions_total
        if total is None or not self.enabled:
            return
        backend_id = backend.backend_id
        last = self._seen.get(backend_id)
        self._seen[backend_id] = total
        if last is None:
            return
        # A counter that went down was reset (the engine restarted): all of it is new.
        rise = total - last if total >= last else total
        if rise <= 0:
            return
        ratio = max(self.floor_ratio, self.ratio(backend_id, now_s) * self.backoff_ratio)
        self._low[backend_id] = (ratio, now_s)

    def ratio(self, backend_id: BackendId, now_s: float) -> float:
        """``backend_id``'s hold ratio at ``now_s``: ``ceiling_ratio`` unless it preempted lately."""
        low = self._low.get(backend_id)
        if low is None:
            return self.ceiling_ratio
        ratio, since_s = low
        recovered = ratio + (self.ceiling_ratio - self.floor_ratio) * max(
            now_s - since_s, 0.0) / self.recovery_s
        if recovered >= self.ceiling_ratio:
            del self._low[backend_id]  # bookkeeping: the same answer as before, from now on
            return self.ceiling_ratio
        return recovered

    def remove_backend(self, backend_id: BackendId) -> None:
        self._seen.pop(backend_id, None)
        self._low.pop(backend_id, None)
