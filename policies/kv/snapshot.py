"""An image of a ``PrefixIndex``'s event-fed contents, to warm another replica's index.

A router replica that starts late knows only what the engines' replay buffers still hold;
blocks stored before that are invisible to it, though its siblings index them. A sibling's
image carries exactly what the index needs to go on from there: every block an event-fed
(precise) backend holds, with its tier bits, in the index's LRU order; each such backend's
engine-hash -> router-hash map (so the engine's later removals and children resolve); its
served model (for rehashing later events); and the fleet-shared tier.

Layout, chosen to encode compactly (the router ships the arrays as raw bytes)::

    IndexImage.block_hashes          array('Q'): every block held, least recent first
    BackendImage.positions           array('I'): indices into block_hashes
    BackendImage.tiers               bytes: tier bits per position (1 GPU, 2 CPU, 4 STORAGE)
    BackendImage.engine_hashes/router_hashes   array('Q') x 2: the engine map

Orphan chains (blocks under a parent the sibling never saw, kept negative in the engine map
and never indexed) are left out: to the restored index their descendants are orphans all the
same. Approximate-mode records (the sibling's own dispatches, with its monotonic expiry
times) are left out too: they are not the engines' truth.

``take(index)`` is ``image_of(cut(index))``. ``cut`` copies the index's dicts (C speed) and
must run in one go: the index is mutated only on the router's event loop, so that is one
consistent cut. ``image_of`` does the O(blocks + engine-map entries) Python work on the
copies, so the router can run it in a worker thread while it goes on routing. ``restore(index,
image)`` fills backends the index does not know yet and leaves any it knows alone (their own
events are fresher); it validates the whole image before touching the index. A friend module
of ``policies.kv.index``: it reads and fills the index's internals, which that module (over
its size budget) leaves to it. Pure: standard library and ``policies`` only.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from policies.kv.feed import low_water
from policies.kv.index import PrefixIndex
from policies.types import BackendId, BlockHash

__all__ = ["BackendImage", "IndexCut", "IndexImage", "check", "cut", "image_of", "restore", "take"]

_BITS = 3  # per backend slot, as in policies.kv.index
_U64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class BackendImage:
    backend_id: BackendId
    model: str | None
    positions: array[int]
    tiers: bytes
    engine_hashes: array[int]
    router_hashes: array[int]


@dataclass(frozen=True, slots=True)
class IndexImage:
    block_hashes: array[int]
    backends: tuple[BackendImage, ...]
    shared_blocks: array[int]
    shared_engine_hashes: array[int]
    shared_router_hashes: array[int]

    @property
    def entries(self) -> int:
        """(block, backend) pairs in the image."""
        return sum(len(b.positions) for b in self.backends)


@dataclass(frozen=True, slots=True)
class IndexCut:
    """Copies of what an image needs, made in one go (dict copies run at C speed), so the
    image can be built off the event loop while the index goes on changing."""

    nodes: dict[BlockHash, int]
    backends: tuple[tuple[BackendId, int, str | None, dict[int, BlockHash]], ...]
    """(id, slot, model, engine map) of each precise backend."""
    all_precise: bool
    shared_blocks: list[BlockHash]
    shared_map: dict[int, BlockHash]


def cut(index: PrefixIndex) -> IndexCut:
    """The consistent part of ``take``: O(entries) of C-level copying."""
    backends = tuple((b.backend_id, b.slot, index._models.get(b.backend_id),
                      dict(b.engine_to_router))
                     for b in index._backends.values() if b.precise)
    shared_blocks, shared_map = index._shared.export()
    return IndexCut(dict(index._nodes), backends,
                    len(backends) == len(index._backends), shared_blocks, shared_map)


def take(index: PrefixIndex) -> IndexImage:
    """The event-fed part of ``index``, as it is now."""
    return image_of(cut(index))


def image_of(taken: IndexCut) -> IndexImage:
    """The image of a cut: O(blocks + engine-map entries) of Python work, whatever the
    number of backends; touches nothing but the cut."""
    by_slot = {slot: (array("I"), bytearray()) for _, slot, _, _ in taken.backends}
    mask = 0
    for slot in by_slot:
        mask |= 7 << (_BITS * slot)
    nodes = taken.nodes
    values: Iterable[int]
    if taken.all_precise:
        hashes = array("Q", nodes)  # every block is some precise backend's: copied in C
        values = nodes.values()
    else:
        kept = [(h, v & mask) for h, v in nodes.items() if v & mask]
        hashes = array("Q", [h for h, _ in kept])
        values = [v for _, v in kept]
    # A node's value is one of few patterns (which slots hold it, in which tiers): decode
    # each pattern once into the appends it means.
    plans: dict[int, list[tuple[Callable[[int], None], Callable[[int], None], int]]] = {}
    for i, v in enumerate(values):
        plan = plans.get(v)
        if plan is None:
            plan = plans[v] = []
            rest = v & mask
            while rest:
                low = rest & -rest
                slot = (low.bit_length() - 1) // _BITS
                positions, tiers = by_slot[slot]
                plan.append((positions.append, tiers.append, (rest >> (_BITS * slot)) & 7))
                rest &= ~(7 << (_BITS * slot))
        for add_position, add_tier, tier_bits in plan:
            add_position(i)
            add_tier(tier_bits)
    backends = []
    for backend_id, slot, model, engine_map in taken.backends:
        positions, tiers = by_slot[slot]
        backends.append(BackendImage(backend_id, model, positions, bytes(tiers),
                                     *_map_arrays(engine_map)))
    return IndexImage(hashes, tuple(backends), array("Q", taken.shared_blocks),
                      *_map_arrays(taken.shared_map))


def _map_arrays(engine_map: dict[int, BlockHash]) -> tuple[array[int], array[int]]:
    try:  # the usual case, in C: no orphan chains (negative) in the map
        return array("Q", engine_map), array("Q", engine_map.values())
    except OverflowError:
        pairs = [(e & _U64, r) for e, r in engine_map.items() if r >= 0]
        return array("Q", [e for e, _ in pairs]), array("Q", [r for _, r in pairs])


def check(image: IndexImage) -> None:
    """ValueError naming what is inconsistent in ``image`` (a sibling's bug or a bad cut)."""
    n = len(image.block_hashes)
    seen: set[str] = set()
    for b in image.backends:
        if b.backend_id in seen:
            raise ValueError(f"backend {b.backend_id!r} appears twice")
        seen.add(b.backend_id)
        if len(b.positions) != len(b.tiers):
            raise ValueError(f"backend {b.backend_id!r}: {len(b.positions)} positions but "
                             f"{len(b.tiers)} tiers")
        if b.positions and max(b.positions) >= n:
            raise ValueError(f"backend {b.backend_id!r}: a position is past the "
                             f"{n} blocks")
        if any(t == 0 or t > 7 for t in b.tiers):
            raise ValueError(f"backend {b.backend_id!r}: tier bits must be 1..7")
        if len(b.engine_hashes) != len(b.router_hashes):
            raise ValueError(f"backend {b.backend_id!r}: engine map lengths differ")
    if len(image.shared_engine_hashes) != len(image.shared_router_hashes):
        raise ValueError("shared tier: engine map lengths differ")


def restore(index: PrefixIndex, image: IndexImage) -> tuple[BackendId, ...]:
    """Fill ``index`` from ``image``; returns the backends restored. ValueError (nothing
    changed) when the image is inconsistent."""
    check(image)
    fresh = [b for b in image.backends
             if b.backend_id not in index._backends or not (
                 index._backends[b.backend_id].precise or index._backends[b.backend_id].entries)]
    bits = [0] * len(image.block_hashes)
    added = 0
    for b in fresh:
        backend = index._backend(b.backend_id)
        backend.precise = True
        if b.model is not None and b.backend_id not in index._models:
            index.set_backend_model(b.backend_id, b.model)
        shift = _BITS * backend.slot
        for position, tier_bits in zip(b.positions, b.tiers, strict=True):
            if not bits[position] >> shift & 7:
                backend.entries += 1
                added += 1
            bits[position] |= tier_bits << shift
        backend.engine_to_router.update(zip(b.engine_hashes, b.router_hashes, strict=True))
    index._version += 1  # the index's last match walk is stale now
    nodes = index._nodes
    for h, v in zip(image.block_hashes, bits, strict=True):
        if v:
            nodes[h] = nodes.pop(h, 0) | v
    index._entries += added
    if not index._shared:
        index._shared.restore(image.shared_blocks, dict(zip(
            image.shared_engine_hashes, image.shared_router_hashes, strict=True)))
    if index._entries > index.max_entries:
        index._evict(index._entries - low_water(index.max_entries))
    return tuple(b.backend_id for b in fresh)
