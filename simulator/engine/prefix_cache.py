"""A paged KV-cache block pool with vLLM's prefix-caching semantics, emitting vLLM's KV events.

Pure and synchronous; imports only the standard library and ``policies.kv.events``. Must not import
``router``, asyncio or anything that reads a clock.

Semantics (vLLM v1 ``BlockPool``/``KVCacheManager``):
- Capacity is ``num_blocks`` blocks of ``block_size`` tokens. A block is either free, held by
  running requests (``ref_count > 0``), or cached-and-evictable (a finished request's block,
  ``ref_count == 0``). Cached-but-evictable blocks count as free in ``used_blocks`` (vLLM's
  ``kv_cache_usage_perc`` does the same).
- Only full blocks are cached, keyed by a chained hash supplied by the caller (``keys[i]``
  depends on ``keys[i-1]``). A request's cached prefix is the longest run of leading keys present.
- Partial tail blocks, and full blocks the caller has no key for, are anonymous: they take
  capacity but are never cached.
- Eviction takes the least recently freed evictable block. A request frees its blocks tail
  first, so a chain's tail blocks are evicted before its head (vLLM appends them to the free
  queue in reverse order). A hit takes the block out of the evictable queue.
- Events: ``BlockStored`` for newly cached blocks (one event per contiguous run, with the parent
  key and the run's token ids when known), ``BlockRemoved`` per evicted block,
  ``AllBlocksCleared`` on reset. No event on a hit. A block computed by two requests at once is
  cached once (the second copy is dropped silently), so replaying the events into an empty set
  always reproduces ``cached_keys()`` exactly.

API: ``match(keys) -> int``, ``count_evictable(keys)``, ``acquire(keys)``, ``store(keys, parent, token_ids, events)``,
``allocate_anonymous(n, events) -> bool``, ``release(keys, anonymous, events)``,
``free_blocks``, ``used_blocks``, ``cached_keys()``, ``reset(events) -> bool``.
Cost: O(1) per block touched; no per-token work.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from policies.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

__all__ = ["PrefixCache"]


class PrefixCache:
    __slots__ = ("_anonymous", "_evictable", "_refs", "block_size", "num_blocks")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs: dict[int, int] = {}
        # Insertion order = eviction order (front first); values unused.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._anonymous = 0

    # -- queries -------------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        """Blocks held by running requests (cached-and-evictable blocks count as free)."""
        return len(self._refs) - len(self._evictable) + self._anonymous

    @property
    def free_blocks(self) -> int:
        """Blocks a new allocation may take, evicting cached blocks if it must."""
        return self.num_blocks - self.used_blocks

    @property
    def usage_ratio(self) -> float:
        return self.used_blocks / self.num_blocks

    def cached_keys(self) -> set[int]:
        """Every cached block key, held or evictable."""
        return set(self._refs)

    def __contains__(self, key: int) -> bool:
        return key in self._refs

    def match(self, keys: Sequence[int]) -> int:
        """How many leading ``keys`` are cached (no side effects)."""
        n = 0
        for key in keys:
            if key not in self._refs:
                break
            n += 1
        return n

    def count_evictable(self, keys: Sequence[int]) -> int:
        """How many of these cached ``keys`` sit in the evictable queue (hitting them uses
        free capacity)."""
        refs = self._refs
        return sum(1 for key in keys if refs[key] == 0)

    def evictable_in_order(self) -> list[int]:
        """Evictable keys, next victim first (for tests and debugging)."""
        return list(self._evictable)

    # -- changes -------------------------------------------------------------------------------

    def acquire(self, keys: Sequence[int]) -> None:
        """Take a reference on cached blocks a request hit (all must be present)."""
        for key in keys:
            ref = self._refs[key]
            if ref == 0:
                del self._evictable[key]
            self._refs[key] = ref + 1

    def allocate_anonymous(self, count: int, events: list[KvEvent]) -> bool:
        """Take ``count`` blocks for uncached content, evicting LRU blocks as needed."""
        if count > self.free_blocks:
            return False
        self._make_room(count, events)
        self._anonymous += count
        return True

    def store(
        self,
        keys: Sequence[int],
        parent: int | None,
        token_ids: Sequence[int],
        events: list[KvEvent],
    ) -> None:
        """Turn anonymous blocks a request already holds into cached blocks ``keys``.

        ``parent`` is the key before ``keys[0]`` (None at a sequence start); ``token_ids`` are
        the blocks' tokens (``len(keys) * block_size``) or empty when unknown.
        """
        if len(keys) > self._anonymous:
            raise ValueError("store() needs one held anonymous block per key")
        run_start = 0
        run_parent = parent
        for i, key in enumerate(keys):
            self._anonymous -= 1
            if key in self._refs:
                # Computed concurrently by another request: keep one copy, share it.
                self._emit_stored(keys, run_start, i, run_parent, token_ids, events)
                self.acquire((key,))
                run_start = i + 1
                run_parent = key
            else:
                self._refs[key] = 1
        self._emit_stored(keys, run_start, len(keys), run_parent, token_ids, events)

    def release(self, keys: Sequence[int], anonymous: int, events: list[KvEvent]) -> None:
        """Drop a request's references: ``keys`` in chain order, plus its anonymous blocks."""
        del events  # releasing never evicts; kept for a uniform call shape
        self._anonymous -= anonymous
        if self._anonymous < 0:
            raise ValueError("released more anonymous blocks than held")
        # Tail first, so the tail is evicted before the head.
        for key in reversed(keys):
            ref = self._refs[key] - 1
            self._refs[key] = ref
            if ref == 0:
                self._evictable[key] = None

    def reset(self, events: list[KvEvent]) -> bool:
        """Drop every cached block, like vLLM's reset_prefix_cache: refused while any is held."""
        if self.used_blocks > 0:
            return False
        self._refs.clear()
        self._evictable.clear()
        events.append(AllBlocksCleared())
        return True

    # -- internals -----------------------------------------------------------------------------

    def _make_room(self, count: int, events: list[KvEvent]) -> None:
        empty = self.num_blocks - len(self._refs) - self._anonymous
        while empty < count:
            key, _ = self._evictable.popitem(last=False)
            del self._refs[key]
            events.append(BlockRemoved(block_hashes=(key,)))
            empty += 1

    def _emit_stored(
        self,
        keys: Sequence[int],
        start: int,
        stop: int,
        parent: int | None,
        token_ids: Sequence[int],
        events: list[KvEvent],
    ) -> None:
        if stop <= start:
            return
        bs = self.block_size
        tokens = tuple(token_ids[start * bs : stop * bs]) if token_ids else ()
        events.append(
            BlockStored(
                block_hashes=tuple(keys[start:stop]),
                parent_block_hash=parent,
                token_ids=tokens,
                block_size=bs,
            )
        )
