"""What one engine's KV events mean in router hashes: tiers, the per-backend engine-hash map,
and the rehashing of ``BlockStored`` token ids. Used by ``policies.kv.index.PrefixIndex``.

Engines hash blocks their own way (vLLM: SHA-256 seeded per process), so the router never
reproduces engine hashes: it rehashes each stored block's token ids with its own namespace
(``policies.kv.hashing``), chained from the parent's router hash, and remembers
engine hash -> router hash per backend so removals and later children resolve. Must not import
anything outside the standard library, ``xxhash`` and ``policies``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from enum import IntEnum

import xxhash

from policies.kv.events import BlockStored
from policies.kv.hashing import BlockHasher
from policies.types import BackendId, BlockHash

__all__ = ["IndexedBackend", "Tier", "low_water", "orphan_seed", "rehash_stored", "tier_of_medium"]

# Chains under an unknown parent start from a seed derived from it and this constant; no
# namespace root can produce them, so such blocks never match a prompt.
_ORPHAN_SEED = 0x6B76726F7574657F


class Tier(IntEnum):
    GPU = 0
    CPU = 1
    STORAGE = 2


def tier_of_medium(medium: str) -> Tier:
    """vLLM's ``medium``: "GPU" is the engine's own cache (even on CPU engines), "CPU" host
    offload; anything else (disk, LMCache, remote stores) is the slow storage tier."""
    upper = medium.upper()
    if upper in ("GPU", "CUDA", "HBM", ""):
        return Tier.GPU
    if upper in ("CPU", "HOST", "CPU_TIER", "DRAM"):
        return Tier.CPU
    return Tier.STORAGE


class IndexedBackend:
    """One backend's slot in the index and its own maps: precise mode keeps engine hash ->
    router hash; approximate mode keeps router hash -> the number of the block's latest
    record (``recorded``), and each live record's expiry by number (``record_expiry``).

    Approximate records leave oldest first (expiry and the capacity bound), where a block's
    age is that of its latest record. The order lives in ``records``, one entry per record
    call (its chain and number). A block is dropped when the front record reaches it and it
    still belongs to that record. Past a block recorded again since, the rest of the chain
    was too (every record holds a whole chain from its root), so the walk stops there. The
    deque keeps each live record's chain (the request's own tuple): at most the records of
    the last ``ttl_s``, fewer once the bound drops them.

    So the maps stay plain dicts of atomic values, which the cyclic collector does not
    track: an ``OrderedDict`` would be walked entry by entry in every full collection (~30 ms
    for 16 backends at the bound: bench/collector.py). And nothing walks a dict from its
    front, where a dict keeps a dead slot for each deletion until it resizes (that walk, in
    an earlier plain-dict version, cost more than the rest of a record: bench/README.md,
    "Dispatch records under churn, and what a full collection walks")."""

    __slots__ = ("backend_id", "engine_to_router", "entries", "head_pos", "precise",
                 "record_expiry", "recorded", "records", "slot")

    def __init__(self, backend_id: BackendId, slot: int) -> None:
        self.backend_id = backend_id
        self.slot = slot
        self.precise = False
        self.entries = 0
        self.engine_to_router: dict[int, BlockHash] = {}
        self.recorded: dict[BlockHash, int] = {}
        self.record_expiry: dict[int, float] = {}
        self.records: deque[tuple[tuple[BlockHash, ...], int]] = deque()
        self.head_pos = 0  # blocks of the front record already visited, deepest first

    def expiry_of(self, block_hash: BlockHash) -> float | None:
        """When the latest record of ``block_hash`` expires (None: not recorded)."""
        seq = self.recorded.get(block_hash)
        return None if seq is None else self.record_expiry.get(seq)

    def reset(self) -> None:
        self.entries = 0
        self.engine_to_router = {}
        self.recorded = {}
        self.record_expiry = {}
        self.records = deque()
        self.head_pos = 0


def orphan_seed(parent_engine_hash: int) -> int:
    return xxhash.xxh3_64_intdigest(
        (parent_engine_hash & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"), _ORPHAN_SEED
    )


def low_water(budget: int) -> int:
    """Where a batch eviction stops: 1/16 below the budget, so evictions stay rare."""
    return budget - max(1, budget // 16)


def rehash_stored(
    backend: IndexedBackend,
    event: BlockStored,
    hasher: BlockHasher | None,
) -> tuple[Sequence[BlockHash], bool, bool]:
    """Router hashes of a BlockStored's blocks; records engine -> router in ``backend``.

    ``hasher`` is None when the event carries no token ids: engine hashes are router hashes
    (the simulator's engines), or, for a placeholder (``block_size`` 0, vLLM's offloading
    events), resolve through the engine hashes this backend stored before.
    Returns ``(router_hashes, orphan, malformed)``: ``orphan`` when the parent is unknown (the
    hashes then chain from ``orphan_seed`` and must not be indexed), ``malformed`` when the
    token count does not cover the blocks (only the covered blocks are kept).
    """
    engine_hashes = event.block_hashes
    engine_map = backend.engine_to_router
    orphan = malformed = False
    if hasher is None:
        router_hashes: Sequence[BlockHash] = engine_hashes
        if event.block_size == 0:
            # vLLM's placeholder payload for an offloaded block (hashes only): the engine
            # stored it on GPU first, with tokens, so its router hash is already known.
            resolved = [engine_map.get(h, h) for h in engine_hashes]
            orphan = any(r < 0 for r in resolved)
            router_hashes = [~r if r < 0 else r for r in resolved]
    else:
        block_size = event.block_size
        n_blocks = len(event.token_ids) // block_size if block_size > 0 else 0
        if n_blocks != len(engine_hashes):
            malformed = True
            n_blocks = min(n_blocks, len(engine_hashes))
            engine_hashes = engine_hashes[:n_blocks]
        prev: int | None = None
        if event.parent_block_hash is not None:
            prev = engine_map.get(event.parent_block_hash)
            if prev is None:
                orphan = True
                prev = orphan_seed(event.parent_block_hash)
            elif prev < 0:  # the parent is itself an orphan's descendant
                orphan = True
                prev = ~prev
        tokens = event.token_ids
        if len(tokens) != n_blocks * block_size:
            tokens = tokens[: n_blocks * block_size]
        router_hashes = hasher.extend(prev, tokens)
    # Orphan chains are kept as negative numbers (router hashes are unsigned) so that their
    # descendants are recognised as orphans too and none of them is ever indexed.
    sign = -1 if orphan else 0
    for engine_hash, router_hash in zip(engine_hashes, router_hashes, strict=True):
        engine_map.pop(engine_hash, None)
        engine_map[engine_hash] = router_hash ^ sign
    return router_hashes, orphan, malformed
