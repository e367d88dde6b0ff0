"""PrefixIndex: which backends hold which router block hashes, and in which tier.

A plain synchronous data structure shared by the live router and the simulator: no locks,
tasks, I/O or clock reads (callers pass ``now_s``). Must not import anything outside the
standard library, ``xxhash`` and ``policies``.

API (all hashes are the router's own, from ``policies.kv.hashing``, unless said otherwise)::

    index = PrefixIndex(max_entries=2_000_000)
    index.set_backend_model("http://10.0.0.7:8000", "llama-8b")      # namespace for rehashing
    stored = index.apply("http://10.0.0.7:8000", event, now_s)       # KvEvent -> router hashes
    found = index.match(request.block_hashes, now_s)                 # {backend_id: BackendMatch}
    index.touch(request.block_hashes[:n])                            # keep a hit chain recent
    index.record_dispatch(backend_id, block_hashes, now_s, ttl_s, capacity_blocks=...)
    index.recorded_until(backend_id, block_hash)                       # a record's expiry
    index.remove_backend(backend_id)                                  # purge everything it held
    index.entries, index.stats()                                      # size, bytes, counters

Two ways to feed it, per backend:
- **Precise** (``apply``): engine KV events. ``BlockStored`` token ids are rehashed with the
  router's namespace for that backend's model (``set_backend_model``; LoRA from the event's
  ``lora_name``) and chained from the parent's router hash, found through a per-backend map
  from ENGINE hash to router hash. Empty ``token_ids`` mean the engine hashes already are router
  hashes (the simulator's engines). ``BlockRemoved`` goes through the same map;
  ``AllBlocksCleared`` clears the backend. A parent the map does not know (router joined late,
  lost events) makes the event an orphan: it is counted, its blocks are remembered in the engine
  map (so later children and removals resolve) but not indexed, as their router hashes cannot
  be known. ``apply`` returns the router hashes it indexed, so the router can compare them with
  the hashes it computed for recent requests (token parity). The engine map holds one entry
  per block the engine holds; past ``2 * max_entries`` (lost removals) it keeps only entries
  still indexed.
- **Approximate** (``record_dispatch``): for backends without events, the blocks of each
  request sent there, expiring ``ttl_s`` after the last dispatch that carried them (checked
  lazily against ``now_s``) and capped at the backend's estimated capacity in blocks. A backend
  that sends events is never overwritten by dispatch records.

Match: ``match`` walks the request's chain once, keeping the set of backends still matching
as a bitmask, and stops at the first block no candidate holds: cost O(blocks matched); the
same chain (a tuple) again with nothing changed since reuses that walk: O(backends). A
backend's result is its longest held chain prefix with the blocks per tier (GPU, CPU offload,
storage; from the event's ``medium``), each block counted in its best tier.

Fleet-shared tier (``policies.kv.shared``): a block announced with ``locality`` "REMOTE" (a
shared store such as LMCache on Redis/Valkey or a Mooncake store) is kept ONCE, not in the
publisher's slot, and every backend holds it at that tier: the match walk goes on through a
shared block for every backend still matching, counting it in ``shared_blocks`` where the
backend has no copy of its own. ``shared_blocks`` and ``stats()`` count it; ``entries`` does
not (it is bounded by ``max_entries`` on its own). Cost: one dict lookup more per block walked,
and O(backends still matching) per shared block.

Memory: one dict entry (router hash -> packed tier bits, 3 bits per backend slot) per block,
plus one engine-map entry per (block, backend). The node dict's insertion order is the LRU
order; stores, dispatch records and ``touch`` re-insert a chain deepest block first so that a
chain's tail is evicted before its head. When ``entries`` ((block, backend) pairs) exceeds
``max_entries``, the least recent blocks are evicted in one batch to 15/16 of the budget.
``bench/index.py`` measures bytes per entry (tracemalloc) and ingestion rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from policies.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, is_shared
from policies.kv.feed import IndexedBackend, Tier, low_water, rehash_stored, tier_of_medium
from policies.kv.hashing import BlockHasher, Namespace
from policies.kv.shared import SharedTier
from policies.types import BackendId, BackendMatch, BlockHash

__all__ = ["BackendMatch", "IndexStats", "PrefixIndex", "Tier", "tier_of_medium"]

_BITS = 3  # per backend slot: GPU, CPU, STORAGE


@dataclass(frozen=True, slots=True)
class IndexStats:
    entries: int
    blocks: int
    backends: int
    estimated_bytes: int
    orphan_events: int
    malformed_events: int
    unknown_removals: int
    evicted_entries: int
    expired_entries: int
    shared_blocks: int = 0


class PrefixIndex:
    """Router block hash -> backends (and tiers) holding it. See the module docstring."""

    def __init__(self, max_entries: int = 2_000_000) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.max_entries = max_entries
        self._nodes: dict[BlockHash, int] = {}
        self._backends: dict[BackendId, IndexedBackend] = {}
        self._by_slot: dict[int, IndexedBackend] = {}
        self._models: dict[BackendId, str] = {}
        self._hashers: dict[tuple[str, str | None, int], BlockHasher] = {}
        self._live_low = 0  # bit 3*slot set for every slot in use
        self._shared = SharedTier(max_entries)
        self._entries = 0
        self.orphan_events = 0
        self.malformed_events = 0
        self.unknown_removals = 0
        self.evicted_entries = 0
        self.expired_entries = 0
        # The last match's walk, before expiry: (hashes, version, per backend (backend,
        # matched, cpu, storage, shared-only blocks)). A hot prompt is matched again and again
        # while nothing it could see changed; every change bumps ``_version``.
        self._version = 0
        self._record_seq = 0  # numbers approximate-mode records, oldest first
        self._walked: tuple[Sequence[BlockHash], int,
                            tuple[tuple[IndexedBackend, int, int, int, int], ...]] | None = None

    # ---- size -------------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        """(block, backend) pairs indexed; tiers of one pair count once."""
        return self._entries

    def backend_entries(self, backend_id: BackendId) -> int:
        backend = self._backends.get(backend_id)
        return 0 if backend is None else backend.entries

    def backend_ids(self) -> tuple[BackendId, ...]:
        return tuple(self._backends)

    def estimated_bytes(self) -> int:
        """CPython-model estimate: ~40 B per dict slot plus ~32 B per int object."""
        maps = sum(len(b.engine_to_router) + len(b.recorded) for b in self._backends.values())
        maps += len(self._shared) + self._shared.map_entries()
        return len(self._nodes) * (40 + 32 + 32) + maps * (40 + 32)

    @property
    def shared_blocks(self) -> int:
        """Blocks of the fleet-shared tier (each once, whoever announced it)."""
        return len(self._shared)

    def stats(self) -> IndexStats:
        return IndexStats(
            entries=self._entries,
            blocks=len(self._nodes),
            backends=len(self._backends),
            estimated_bytes=self.estimated_bytes(),
            orphan_events=self.orphan_events,
            malformed_events=self.malformed_events,
            unknown_removals=self.unknown_removals,
            evicted_entries=self.evicted_entries,
            expired_entries=self.expired_entries,
            shared_blocks=len(self._shared),
        )

    # ---- backends ---------------------------------------------------------------------------

    def set_backend_model(self, backend_id: BackendId, model: str) -> None:
        """The served base model whose namespace rehashes this backend's event token ids."""
        self._models[backend_id] = model

    def has_model(self, backend_id: BackendId) -> bool:
        return backend_id in self._models

    def _backend(self, backend_id: BackendId) -> IndexedBackend:
        backend = self._backends.get(backend_id)
        if backend is None:
            self._version += 1
            slot = 0
            while slot in self._by_slot:
                slot += 1
            backend = IndexedBackend(backend_id, slot)
            self._backends[backend_id] = backend
            self._by_slot[slot] = backend
            self._live_low |= 1 << (_BITS * slot)
        return backend

    def remove_backend(self, backend_id: BackendId) -> None:
        """Forget everything ``backend_id`` held and free its slot."""
        self._version += 1
        backend = self._backends.pop(backend_id, None)
        self._models.pop(backend_id, None)
        if backend is None:
            return
        self._clear(backend)
        del self._by_slot[backend.slot]
        self._live_low &= ~(1 << (_BITS * backend.slot))

    def _clear(self, backend: IndexedBackend) -> None:
        keep = ~(7 << (_BITS * backend.slot))
        held: Iterable[BlockHash] = (
            backend.recorded if backend.recorded else set(backend.engine_to_router.values())
        )
        for h in held:
            self._mask(h, keep)
        self._entries -= backend.entries
        backend.reset()

    # ---- precise mode: engine events ----------------------------------------------------------

    def apply(self, backend_id: BackendId, event: KvEvent, now_s: float) -> tuple[BlockHash, ...]:
        """Apply one engine event; returns the router hashes newly indexed (BlockStored only).

        Raises ValueError when token ids must be rehashed but no model was set for the backend.
        """
        self._version += 1
        backend = self._backend(backend_id)
        if backend.recorded:
            # Events are the truth; dispatch records made before they started are dropped.
            self._clear(backend)
        backend.precise = True
        if isinstance(event, BlockStored):
            if is_shared(event.locality):
                hasher = self._hasher(backend, event) if event.token_ids else None
                return self._shared.store(backend, event, hasher)
            return self._store(backend, event)
        if isinstance(event, BlockRemoved):
            if is_shared(event.locality):
                self._shared.remove(event)
                return ()
            self._remove(backend, event)
        elif isinstance(event, AllBlocksCleared):
            self._clear(backend)
        return ()

    def _hasher(self, backend: IndexedBackend, event: BlockStored) -> BlockHasher:
        model = self._models.get(backend.backend_id)
        if model is None:
            raise ValueError(
                f"backend {backend.backend_id!r} sent token ids but has no model; "
                "call PrefixIndex.set_backend_model first"
            )
        key = (model, event.lora_name, event.block_size)
        hasher = self._hashers.get(key)
        if hasher is None:
            hasher = BlockHasher(Namespace(model, event.lora_name), event.block_size)
            self._hashers[key] = hasher
        return hasher

    def _store(self, backend: IndexedBackend, event: BlockStored) -> tuple[BlockHash, ...]:
        hasher = self._hasher(backend, event) if event.token_ids else None
        router_hashes, orphan, malformed = rehash_stored(backend, event, hasher)
        self.orphan_events += orphan
        self.malformed_events += malformed
        if not orphan:
            self._hold(backend, router_hashes, tier_of_medium(event.medium))
        if len(backend.engine_to_router) > 2 * self.max_entries:
            self._sweep_engine_map(backend)
        return () if orphan else tuple(router_hashes)

    def _sweep_engine_map(self, backend: IndexedBackend) -> None:
        # The map outgrows the index only through lost removals or index evictions. Keep every
        # entry still indexed for this backend (its removal must resolve); drop the rest.
        slot_bits = 7 << (_BITS * backend.slot)
        nodes = self._nodes
        backend.engine_to_router = {
            e: r for e, r in backend.engine_to_router.items() if nodes.get(r, 0) & slot_bits
        }

    def _remove(self, backend: IndexedBackend, event: BlockRemoved) -> None:
        tier_bit = 1 << (_BITS * backend.slot + tier_of_medium(event.medium))
        slot_bits = 7 << (_BITS * backend.slot)
        engine_map = backend.engine_to_router
        nodes = self._nodes
        for engine_hash in event.block_hashes:
            router_hash = engine_map.get(engine_hash)
            if router_hash is None:
                self.unknown_removals += 1
                continue
            v = nodes.get(router_hash)
            if v is None or not v & tier_bit:
                if v is None or not v & slot_bits:
                    del engine_map[engine_hash]
                continue
            v &= ~tier_bit
            if not v & slot_bits:
                del engine_map[engine_hash]
                backend.entries -= 1
                self._entries -= 1
            if v:
                nodes[router_hash] = v
            else:
                del nodes[router_hash]

    # ---- approximate mode: the router's own dispatches ---------------------------------------

    def record_dispatch(
        self,
        backend_id: BackendId,
        block_hashes: Sequence[BlockHash],
        now_s: float,
        ttl_s: float,
        capacity_blocks: int | None = None,
    ) -> None:
        """Assume ``backend_id`` caches these blocks until ``now_s + ttl_s``.

        Ignored for a backend that sends events. Keep ``ttl_s`` constant per backend: ``match``
        relies on expiry times never increasing along a chain.
        """
        backend = self._backend(backend_id)
        if backend.precise or not block_hashes:
            return
        self._version += 1
        # Oldest first, and expiry follows record order (constant ttl, time only moves
        # forward): the expired records lead, so stop at the first live one.
        self.expired_entries += self._drop_oldest(backend, 64, now_s)
        chain = tuple(block_hashes)  # kept for the drop: the caller's tuple, not a copy
        self._record_seq += 1
        seq = self._record_seq
        backend.record_expiry[seq] = now_s + ttl_s
        recorded = backend.recorded
        for h in chain:
            recorded[h] = seq
        backend.records.append((chain, seq))
        self._hold(backend, chain, Tier.GPU)
        if capacity_blocks is not None and len(recorded) > capacity_blocks:
            self._drop_oldest(backend, len(recorded) - low_water(max(capacity_blocks, 1)))

    def recorded_until(self, backend_id: BackendId, block_hash: BlockHash) -> float | None:
        """When ``backend_id``'s dispatch record of ``block_hash`` expires (None: not recorded).

        Every record holds a whole chain, inserted deepest block first and given one expiry,
        so in an index fed by records alone (a policy's own) the deepest block is its chain's
        first to expire or be evicted: while it is recorded and unexpired, so is every block
        before it. (Events storing part of a chain can reorder the shared LRU.)"""
        backend = self._backends.get(backend_id)
        return None if backend is None else backend.expiry_of(block_hash)

    def _drop_oldest(self, backend: IndexedBackend, count: int,
                     expired_at_s: float = math.inf) -> int:
        """Drop up to ``count`` of ``backend``'s oldest recorded blocks, only those whose
        expiry is at most ``expired_at_s``; returns how many. Oldest is record order, and
        within a record deepest block first (the order a record stores them in), each block
        counted at its latest record."""
        records = backend.records
        recorded = backend.recorded
        record_expiry = backend.record_expiry
        keep = ~(7 << (_BITS * backend.slot))
        dropped = 0
        while dropped < count and records:
            chain, seq = records[0]
            if record_expiry[seq] > expired_at_s:
                break
            pos = backend.head_pos
            n = len(chain)
            while pos < n and dropped < count:
                h = chain[n - 1 - pos]
                pos += 1
                latest = recorded.get(h)
                if latest != seq:
                    if latest is not None:
                        # Recorded again since: so was every block before it (a record holds
                        # a whole chain from its root), and they all leave with that record.
                        pos = n
                    continue  # (None: dropped or evicted already)
                del recorded[h]
                dropped += 1
                self._mask(h, keep)
            if pos < n:
                backend.head_pos = pos
                break
            records.popleft()
            del record_expiry[seq]
            backend.head_pos = 0
        backend.entries -= dropped
        self._entries -= dropped
        return dropped

    def _mask(self, block_hash: BlockHash, keep: int) -> None:
        """Leave only the ``keep`` bits of ``block_hash``'s node; no bits left, no node."""
        v = self._nodes.get(block_hash)
        if v is None:
            return
        v &= keep
        if v:
            self._nodes[block_hash] = v
        else:
            del self._nodes[block_hash]

    # ---- shared ------------------------------------------------------------------------------

    def _hold(self, backend: IndexedBackend, hashes: Sequence[BlockHash], tier: Tier) -> None:
        shift = _BITS * backend.slot
        bit = 1 << (shift + tier)
        slot_bits = 7 << shift
        nodes = self._nodes
        added = 0
        for h in reversed(hashes):
            v = nodes.pop(h, 0)
            if not v & slot_bits:
                added += 1
            nodes[h] = v | bit
        backend.entries += added
        self._entries += added
        if self._entries > self.max_entries:
            self._evict(self._entries - low_water(self.max_entries))

    def _evict(self, n_entries: int) -> None:
        self._version += 1
        nodes = self._nodes
        by_slot = self._by_slot
        evicted = 0
        victims = []
        for h in nodes:
            if evicted >= n_entries:
                break
            victims.append(h)
            v = nodes[h]
            while v:
                low = v & -v
                slot = (low.bit_length() - 1) // _BITS
                v &= ~(7 << (_BITS * slot))
                evicted += 1
        for h in victims:
            v = nodes.pop(h)
            while v:
                low = v & -v
                slot = (low.bit_length() - 1) // _BITS
                v &= ~(7 << (_BITS * slot))
                backend = by_slot[slot]
                backend.entries -= 1
                backend.recorded.pop(h, None)
        self._entries -= evicted
        self.evicted_entries += evicted

    def touch(self, block_hashes: Sequence[BlockHash]) -> None:
        """Mark a chain recently used (deepest block first), e.g. the hit part of a dispatch."""
        nodes = self._nodes
        for h in reversed(block_hashes):
            v = nodes.pop(h, None)
            if v is not None:
                nodes[h] = v
        if self._shared:
            self._shared.touch(block_hashes)

    def shared_prefix(self, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks the fleet-shared tier holds: what a backend the index has never
        heard from (no events yet) can still load."""
        shared = self._shared
        if not shared:
            return 0
        n = 0
        for h in block_hashes:
            if h not in shared:
                break
            n += 1
        return n

    def match(
        self, block_hashes: Sequence[BlockHash], now_s: float | None = None
    ) -> dict[BackendId, BackendMatch]:
        """Per backend holding at least the first block: its longest held prefix by tier.

        ``now_s`` expires approximate-mode records; ``None`` ignores expiry.

        The walk of the same chain (a tuple) with nothing changed since is taken from the
        last call: only expiry is applied again. A hot prompt then costs O(backends), not
        O(blocks) (83 blocks: ~15 us a request, bench/README.md).
        """
        walked, version = self._walked, self._version
        if (walked is not None and walked[1] == version
                and (walked[0] is block_hashes or walked[0] == block_hashes)):
            ends = walked[2]
        else:
            ends = self._walk(block_hashes)
            if type(block_hashes) is tuple:  # immutable: safe to keep as the key
                self._walked = (block_hashes, version, ends)
        out: dict[BackendId, BackendMatch] = {}
        for backend, matched, cpu, storage, shared_only in ends:
            if backend.recorded and now_s is not None:
                matched = _unexpired_prefix(backend, block_hashes, matched, now_s)
                if matched == 0:
                    continue
                cpu = storage = shared_only = 0
            out[backend.backend_id] = BackendMatch(
                backend.backend_id, matched, matched - cpu - storage - shared_only, cpu, storage,
                shared_only,
            )
        return out

    def _walk(self, block_hashes: Sequence[BlockHash]
              ) -> tuple[tuple[IndexedBackend, int, int, int, int], ...]:
        """Per backend holding at least the first block, in slot order: (backend, matched,
        cpu, storage, shared-only blocks), before expiry."""
        nodes = self._nodes
        shared = self._shared
        active = self._live_low
        ended: dict[int, int] = {}  # slot bit -> matched blocks
        lower: dict[int, list[int]] = {}  # slot bit -> [cpu_blocks, storage_blocks]
        # Shared blocks are counted once per walk, not per backend: a backend's shared-only
        # blocks are the shared blocks before its end minus those it also held itself.
        shared_seen = 0
        shared_at_end: dict[int, int] = {}  # slot bit -> shared blocks walked when it ended
        own_at_shared: dict[int, int] = {}  # slot bit -> shared blocks it held a copy of
        n = 0
        # The shared tier's blocks, or None: asked once per walk, not once per block (a
        # method call per block was a tenth of a 83-block match).
        shared_blocks = shared.blocks() if shared else None
        for h in block_hashes:
            v = nodes.get(h)
            in_shared = shared_blocks is not None and h in shared_blocks
            if in_shared:
                v = v or 0  # every backend still matching holds it at the shared tier
                held = active
            elif v is None:
                break
            else:
                held = (v | (v >> 1) | (v >> 2)) & active
            if held != active:
                gone = active & ~held
                while gone:
                    low = gone & -gone
                    ended[low] = n
                    shared_at_end[low] = shared_seen
                    gone ^= low
                active = held
                if not active:
                    break
            if v:
                below_gpu = active & ~v
                if in_shared:
                    own = active & (v | (v >> 1) | (v >> 2))
                    below_gpu &= own
                    while own:
                        low = own & -own
                        own_at_shared[low] = own_at_shared.get(low, 0) + 1
                        own ^= low
                while below_gpu:
                    low = below_gpu & -below_gpu
                    counts = lower.setdefault(low, [0, 0])
                    counts[0 if v & (low << 1) else 1] += 1
                    below_gpu ^= low
            shared_seen += in_shared
            n += 1
        while active:
            low = active & -active
            ended[low] = n
            shared_at_end[low] = shared_seen
            active ^= low
        by_slot = self._by_slot
        return tuple(
            (by_slot[(low.bit_length() - 1) // _BITS], matched, *lower.get(low, (0, 0)),
             shared_at_end[low] - own_at_shared.get(low, 0))
            for low, matched in sorted(ended.items()) if matched)


def _unexpired_prefix(
    backend: IndexedBackend, hashes: Sequence[BlockHash], matched: int, now_s: float
) -> int:
    # Expiry never increases along a chain (every dispatch carrying block k carried 0..k-1),
    # so the unexpired part is a prefix: binary search it, after the common case (all of it).
    if matched and _alive(backend, hashes[matched - 1], now_s):
        return matched
    lo, hi = 0, matched - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _alive(backend, hashes[mid - 1], now_s):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _alive(backend: IndexedBackend, block_hash: BlockHash, now_s: float) -> bool:
    expiry_s = backend.expiry_of(block_hash)
    return expiry_s is not None and expiry_s > now_s
