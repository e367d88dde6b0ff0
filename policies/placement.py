"""Placement memory: the backend each prefix was last sent to, kept after its KV is evicted.

Engine events say where blocks ARE cached; once a prefix is evicted everywhere they say
nothing, and a policy that forgets where the prefix lived scatters its later requests over
the fleet. Each cache then holds copies of the same prefixes instead of its own share of the
working set. The approximate routers (sglang-router's character tree) never forget, which is
why they win under cache pressure. This keeps that one fact, nothing more: block hash ->
the backend that most recently received a request holding that block.

``record(backend, hashes)`` stores every block of a dispatched prompt under ``backend``
(replacing an older home). ``home(hashes)`` returns the home of the request's deepest
recorded block and that depth. ``homed_blocks(backend)`` counts the blocks whose home is
``backend``: the share of the remembered working set assigned to it, evicted or not. Every record covers a whole chain, ancestors stored after
descendants, so the recorded set stays prefix-closed under oldest-first eviction and the
deepest recorded block is found by binary search.

Bounded: at most ``max_entries`` blocks; past that the oldest go in one batch, down to 1/16
below the budget (at most 4,096 blocks), so the walk to the oldest is paid once per batch.
Cost: O(blocks) per record, O(log blocks) dict lookups per query, O(1) per ``homed_blocks``.
Pure: no clock, I/O or randomness.

A plain dict, not an ``OrderedDict``: its int keys and str values are atomic, so the cyclic
collector does not track it, where a full collection walks every entry of an ``OrderedDict``
with the event loop stopped (40 ms with a full budget of 10^6 blocks: bench/collector.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from policies.types import BackendId, BlockHash

__all__ = ["PlacementMemory"]

# The most blocks one record drops past the budget. Each batch walks from the front of the
# dict, over the slots earlier batches deleted (until the dict next resizes): at a 10^6
# budget a record that dropped 4,096 took up to 10 ms, one that dropped 62,500 (1/16) up to
# 26 ms (sources, never-repeating prompts). The mean record still costs less than the
# OrderedDict's (bench/index.py, placement_memory_1m_blocks).
_BATCH_BLOCKS = 4096


class PlacementMemory:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._home: dict[BlockHash, BackendId] = {}  # oldest first
        self._homed: dict[BackendId, int] = {}

    def __len__(self) -> int:
        return len(self._home)

    def record(self, backend_id: BackendId, block_hashes: Sequence[BlockHash]) -> None:
        home = self._home
        homed = self._homed
        moved = 0
        for h in reversed(block_hashes):
            old = home.pop(h, None)  # and set again below: the block moves to the newest end
            if old != backend_id:
                moved += 1
                if old is not None:
                    homed[old] -= 1
            home[h] = backend_id
        homed[backend_id] = homed.get(backend_id, 0) + moved
        if len(home) > self.max_entries:
            low_water = self.max_entries - min(max(1, self.max_entries // 16), _BATCH_BLOCKS)
            for h in list(islice(home, len(home) - low_water)):
                homed[home.pop(h)] -= 1

    def home(self, block_hashes: Sequence[BlockHash]) -> tuple[BackendId | None, int]:
        """The home of the deepest recorded block and the number of blocks up to it."""
        home = self._home
        lo, hi = 0, len(block_hashes)  # invariant: blocks [0, lo) recorded, [hi, n) not
        while lo < hi:
            mid = (lo + hi) // 2
            if block_hashes[mid] in home:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None, 0
        return home[block_hashes[lo - 1]], lo

    def homed_blocks(self, backend_id: BackendId) -> int:
        """Blocks whose home is ``backend_id``."""
        return self._homed.get(backend_id, 0)

    def remove_backend(self, backend_id: BackendId) -> None:
        for h in [h for h, b in self._home.items() if b == backend_id]:
            del self._home[h]
        self._homed.pop(backend_id, None)
