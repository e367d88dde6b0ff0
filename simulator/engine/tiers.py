"""KV tiers below an engine's HBM: a per-engine CPU offload LRU and a fleet-shared store.

Pure and synchronous; imports only the standard library and ``policies.kv.events``. Must not
import ``router``, asyncio or anything that reads a clock.

Semantics follow vLLM 0.32's native offloading (``OffloadingConnector`` with the CPU backend,
read from its source):
- **Write-through on compute.** Every full block the engine computes and caches on GPU is
  also stored in the CPU tier (vLLM schedules the store as soon as the block is computed, not
  when the GPU evicts it), so after a GPU eviction the block is still on CPU. Storing a block
  already there only refreshes its recency.
- **LRU of a fixed size.** Capacity ``capacity_blocks``; a store into a full tier evicts the
  least recently stored or loaded block.
- **Loads, not recomputes.** A request whose prefix continues past its GPU hit into this tier
  loads those blocks (host-to-device DMA) and computes only the rest: the cost is
  ``tokens x kv_bytes_per_token / bandwidth``, which the engine model charges as a wait before
  the request's first chunk (``simulator.engine.model``). A load refreshes recency.
- **Events** as vLLM publishes them for the offloading tier: ``BlockStored`` with ``medium``
  "CPU", the block hashes, no parent and no token ids (vLLM's default placeholder payload);
  ``BlockRemoved`` with ``medium`` "CPU" per evicted block.

``SharedStore`` is one such LRU for the whole fleet (an LMCache remote backend or a Mooncake
store): every engine writes through into it and every engine can load from it, at the
store's network bandwidth. Its events carry ``locality`` "REMOTE" (vLLM 0.32's field for a
tier beyond the publishing engine) and ``medium`` "STORAGE"; the engine whose write caused a
store or an eviction publishes the event.

Cost: O(1) per block touched.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from policies.kv.events import REMOTE, BlockRemoved, BlockStored, KvEvent
from simulator.engine.cost_model import CostModel

__all__ = ["REMOTE_MEDIUM", "BlockLru", "EngineTiers", "SharedStore"]

REMOTE_MEDIUM = "STORAGE"
"""vLLM's ``MEDIUM_STORAGE``: what a shared store's blocks are announced as (with locality)."""


class BlockLru:
    """An LRU set of block keys with vLLM-shaped events; see the module docstring."""

    __slots__ = ("_keys", "block_size", "capacity_blocks", "locality", "medium", "stored_blocks")

    def __init__(
        self, capacity_blocks: int, block_size: int, medium: str, locality: str | None = None
    ) -> None:
        if capacity_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"tier capacity_blocks and block_size must be > 0, got {capacity_blocks}, {block_size}"
            )
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.medium = medium
        self.locality = locality
        self._keys: OrderedDict[int, None] = OrderedDict()
        self.stored_blocks = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return key in self._keys

    def keys(self) -> set[int]:
        return set(self._keys)

    def match(self, keys: Sequence[int]) -> int:
        """How many leading ``keys`` this tier holds (no side effects)."""
        n = 0
        held = self._keys
        for key in keys:
            if key not in held:
                break
            n += 1
        return n

    def touch(self, keys: Sequence[int]) -> None:
        """Keys just loaded: most recent now (deepest last, so a chain's head outlives its tail)."""
        held = self._keys
        for key in reversed(keys):
            if key in held:
                held.move_to_end(key)

    def store(self, keys: Sequence[int], events: list[KvEvent]) -> None:
        """Write blocks through; new ones are announced, evictions too."""
        held = self._keys
        new: list[int] = []
        for key in reversed(keys):
            if key in held:
                held.move_to_end(key)
            else:
                held[key] = None
                new.append(key)
        if not new:
            return
        new.reverse()
        self.stored_blocks += len(new)
        # vLLM's placeholder payload for an offloaded block: hashes only (block_size 0).
        events.append(BlockStored(tuple(new), None, (), 0, medium=self.medium,
                                  locality=self.locality))
        while len(held) > self.capacity_blocks:
            key, _ = held.popitem(last=False)
            events.append(BlockRemoved((key,), medium=self.medium, locality=self.locality))


class SharedStore(BlockLru):
    """The fleet-shared tier: one object handed to every engine of a fleet."""

    __slots__ = ()

    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        super().__init__(capacity_blocks, block_size, medium=REMOTE_MEDIUM, locality=REMOTE)


class EngineTiers:
    """One engine's tiers below HBM (its own CPU LRU, the fleet's store) and its load link.

    ``match`` finds the blocks past a GPU hit that a tier holds, in a run from the first (CPU
    preferred: PCIe is faster than the network); ``load`` queues their transfer on the
    engine's one link (CPU and network loads share it, a simplification) and says when it
    ends; ``write_through`` stores newly computed blocks in every tier.
    """

    __slots__ = ("_cost", "block_size", "cpu", "cpu_hit_tokens", "link_free_s", "shared",
                 "shared_hit_tokens")

    def __init__(
        self, cost: CostModel, block_size: int, cpu_blocks: int, shared: SharedStore | None
    ) -> None:
        if shared is not None and shared.block_size != block_size:
            raise ValueError("the shared store's block_size differs from the engine's")
        self._cost = cost
        self.block_size = block_size
        self.cpu = BlockLru(cpu_blocks, block_size, "CPU") if cpu_blocks else None
        self.shared = shared
        self.link_free_s = 0.0
        self.cpu_hit_tokens = 0
        self.shared_hit_tokens = 0

    def __bool__(self) -> bool:
        return self.cpu is not None or self.shared is not None

    def match(self, keys: Sequence[int]) -> tuple[int, int]:
        cpu, shared = self.cpu, self.shared
        cpu_n = shared_n = 0
        for key in keys:
            if cpu is not None and key in cpu:
                cpu_n += 1
            elif shared is not None and key in shared:
                shared_n += 1
            else:
                break
        return cpu_n, shared_n

    def load(self, keys: Sequence[int], cpu_n: int, shared_n: int, now_s: float) -> float:
        """Queue the load of ``keys`` (``cpu_n`` from CPU, then ``shared_n`` from the store);
        returns when it ends."""
        if self.cpu is not None:
            self.cpu.touch(keys)
        if self.shared is not None:
            self.shared.touch(keys)
        bs, cost = self.block_size, self._cost
        load_s = (cost.load_s(cpu_n * bs, cost.h2d_bytes_per_s)
                  + cost.load_s(shared_n * bs, cost.shared_store_bytes_per_s))
        self.link_free_s = max(self.link_free_s, now_s) + load_s
        self.cpu_hit_tokens += cpu_n * bs
        self.shared_hit_tokens += shared_n * bs
        return self.link_free_s

    def write_through(self, keys: Sequence[int], events: list[KvEvent]) -> None:
        if self.cpu is not None:
            self.cpu.store(keys, events)
        if self.shared is not None:
            self.shared.store(keys, events)
