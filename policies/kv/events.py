"""KV-cache events as the engines report them, decoded from the wire (router) or emitted by the
engine model (simulator). Hashes here are the ENGINE's block hashes; the index translates them
to the router's own hashes (see ``policies.kv.index``).

Mirrors vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``. An empty
``token_ids`` means the source sent none; the index then resolves the engine hashes through
what the same engine stored earlier, or uses them as-is (the simulator's engines hash with the
router's own scheme, so nothing is lost there). vLLM's CPU offloading announces a block it
copied to host memory that way: ``medium`` "CPU", no token ids, no parent, ``block_size`` 0.

``locality`` is vLLM's (0.32) ``LOCAL``/``REMOTE`` relative to the engine that publishes: a
``REMOTE`` block lives in a fleet-shared store (LMCache/Mooncake style) that every engine can
load from, so the index keeps it once for the whole fleet (``policies.kv.index``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "REMOTE",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KvEvent",
    "KvEventBatch",
    "is_shared",
]

REMOTE = "REMOTE"
"""vLLM's ``Locality.REMOTE``: the block is in a store shared beyond the publishing engine."""


def is_shared(locality: str | None) -> bool:
    return locality is not None and locality.upper() == REMOTE


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str = "GPU"
    lora_name: str | None = None
    locality: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = "GPU"
    locality: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KvEventBatch:
    """One scheduler step's events from one engine rank (one ZMQ message in vLLM)."""

    ts: float
    events: tuple[KvEvent, ...]
    data_parallel_rank: int = 0
