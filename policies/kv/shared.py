"""The fleet-shared KV tier as the index sees it: one set of router block hashes that every
backend can load, kept once for the whole fleet. Used by ``policies.kv.index.PrefixIndex``.

A shared store (LMCache's remote backend on Redis/Valkey, a Mooncake store) holds blocks that
any engine wrote and any engine can load. Engines announce them with vLLM 0.32's
``locality`` "REMOTE" on ``BlockStored``/``BlockRemoved`` (``policies.kv.events``): whichever
engine publishes, the block goes here, not into that engine's slot. Keeping it per writer
would make the router queue behind the writer for a prefix every engine can load.

Hashes: the event's token ids are rehashed like any stored block (``policies.kv.feed``), the
parent resolved through this tier's own engine-hash map or the publishing backend's; without
token ids (vLLM's placeholder payload) each engine hash resolves through those maps, or is
taken as the router's hash (the simulator's engines). Engines sharing a store hash alike
(they must, for the store's keys to match), so one engine-hash map serves the fleet.

Bounded: at most ``max_blocks`` blocks (oldest stored or touched dropped first), one map entry
per block. Cost: O(blocks) per event, O(1) per lookup. Must not import anything outside the
standard library, ``xxhash`` and ``policies``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from policies.kv.events import BlockRemoved, BlockStored
from policies.kv.feed import IndexedBackend, rehash_stored
from policies.kv.hashing import BlockHasher
from policies.types import BlockHash

__all__ = ["SharedTier"]


class SharedTier:
    __slots__ = ("_blocks", "_map", "max_blocks", "orphan_events", "unknown_removals")

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._blocks: dict[BlockHash, None] = {}  # insertion order = LRU order
        # rehash_stored's bookkeeping, over the shared engine-hash map.
        self._map = IndexedBackend("<shared>", -1)
        self.orphan_events = 0
        self.unknown_removals = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks

    def blocks(self) -> Mapping[BlockHash, None]:
        """The resident blocks, read-only (membership tests in a hot loop)."""
        return self._blocks

    def map_entries(self) -> int:
        return len(self._map.engine_to_router)

    def store(
        self, backend: IndexedBackend, event: BlockStored, hasher: BlockHasher | None
    ) -> tuple[BlockHash, ...]:
        shared_map = self._map.engine_to_router
        own = backend.engine_to_router
        wanted = list(event.block_hashes) if hasher is None else []
        if event.parent_block_hash is not None:
            wanted.append(event.parent_block_hash)
        for engine_hash in wanted:
            if engine_hash not in shared_map and engine_hash in own:
                shared_map[engine_hash] = own[engine_hash]
        if hasher is None:
            # Placeholder payload: resolve what the fleet already knows; the rest are taken as
            # router hashes by rehash_stored (the simulator's engines).
            resolved = [shared_map.get(h, h) for h in event.block_hashes]
            if any(h < 0 for h in resolved):
                self.orphan_events += 1
                return ()
            for engine_hash, router_hash in zip(event.block_hashes, resolved, strict=True):
                shared_map[engine_hash] = router_hash
            router_hashes: Sequence[BlockHash] = resolved
        else:
            router_hashes, orphan, _ = rehash_stored(self._map, event, hasher)
            if orphan:
                self.orphan_events += 1
                return ()
        blocks = self._blocks
        for h in reversed(router_hashes):
            blocks.pop(h, None)
            blocks[h] = None
        over = len(blocks) - self.max_blocks
        if over > 0:
            for h in list(blocks)[:over]:
                del blocks[h]
        if len(shared_map) > 2 * self.max_blocks:
            self._map.engine_to_router = {e: r for e, r in shared_map.items() if r in blocks}
        return tuple(router_hashes)

    def remove(self, event: BlockRemoved) -> None:
        shared_map = self._map.engine_to_router
        for engine_hash in event.block_hashes:
            router_hash = shared_map.pop(engine_hash, None)
            if router_hash is None:
                self.unknown_removals += 1
                continue
            self._blocks.pop(router_hash, None)

    def touch(self, block_hashes: Sequence[BlockHash]) -> None:
        blocks = self._blocks
        for h in reversed(block_hashes):
            if h in blocks:
                del blocks[h]
                blocks[h] = None

    def export(self) -> tuple[list[BlockHash], dict[int, BlockHash]]:
        """The blocks (least recent first) and the engine-hash map, for an index image."""
        return list(self._blocks), dict(self._map.engine_to_router)

    def restore(self, blocks: Sequence[BlockHash], engine_map: dict[int, BlockHash]) -> None:
        """Take a sibling's blocks and map (``policies.kv.snapshot``), within ``max_blocks``."""
        for h in blocks[max(0, len(blocks) - self.max_blocks):]:
            self._blocks[h] = None
        self._map.engine_to_router.update(engine_map)

    def clear(self) -> None:
        self._blocks.clear()
        self._map.reset()
