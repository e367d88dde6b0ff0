"""KV-cache events as the engines report them, decoded from the wire (router) or emitted by the
engine model (simulator). Hashes here are the ENGINE's block hashes; the index translates them
to the router's own hashes (see ``policies.kv.index``).

Mirrors vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``. An empty
``token_ids`` means the source sent none; the index then uses the engine hashes as-is (the
simulator's engines hash with the router's own scheme, so nothing is lost there).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "KvEvent", "KvEventBatch"]


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str = "GPU"
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str = "GPU"


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
