"""Record refresh: which prompt chains a policy recorded on which backend moments ago.

A policy that remembers its dispatches (an approximate-mode ``PrefixIndex``, a
``PlacementMemory``) re-records the whole block chain on every dispatch: one dict pop and
insert per block, for a hot prompt whose identical chain went to the same backend a moment
ago (a benchmark sending one prompt; router replicas replaying each other's dispatches).
This remembers when each (backend, chain) was last recorded in full (a chain is named by
its deepest block: hashes are chained, so the deepest names the whole chain); ``fresh``
answers whether that was less than ``refresh_s`` ago, so the caller may skip the record.

What a skip leaves stale is bounded by ``refresh_s``: expiry times (set at the last full
record, not at the latest dispatch), LRU/capacity order, and for a chain sent to several
backends within ``refresh_s``, which of them was last (``kv_aware._recorded_lately``).

Bounded: entries are kept in record order and dropped from the oldest once stale or past
``max_entries``. Cost: O(1) amortised per call. Pure: no clock, I/O or randomness.
"""

from __future__ import annotations

from collections import OrderedDict

from policies.types import BackendId, BlockHash

__all__ = ["RecordRefresh"]


class RecordRefresh:
    def __init__(self, refresh_s: float, max_entries: int = 16384) -> None:
        if not refresh_s >= 0 or max_entries < 1:
            raise ValueError("refresh_s must be >= 0 and max_entries >= 1")
        self.refresh_s = refresh_s
        self.max_entries = max_entries
        # (backend, deepest block hash) -> recorded at, oldest record first
        self._last: OrderedDict[tuple[BackendId, BlockHash], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def fresh(self, backend_id: BackendId, deepest: BlockHash, now_s: float) -> bool:
        """Whether the chain ending in ``deepest`` was recorded on ``backend_id`` less than
        ``refresh_s`` before ``now_s``."""
        recorded_s = self._last.get((backend_id, deepest))
        return recorded_s is not None and now_s - recorded_s < self.refresh_s

    def note(self, backend_id: BackendId, deepest: BlockHash, now_s: float) -> None:
        """The chain ending in ``deepest`` was just recorded in full on ``backend_id``."""
        if not self.refresh_s:
            return
        last = self._last
        key = (backend_id, deepest)
        last[key] = now_s
        last.move_to_end(key)
        # Record order is time order (now_s never decreases), so the stale ones lead; each
        # entry is dropped once (an OrderedDict pops its oldest in O(1), a dict does not).
        stale_before_s = now_s - self.refresh_s
        while len(last) > self.max_entries or next(iter(last.values())) <= stale_before_s:
            last.popitem(last=False)

    def clear(self) -> None:
        self._last.clear()
