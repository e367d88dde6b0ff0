"""Decoding vLLM's KV-event ZMQ messages into ``policies.kv.events`` values.

A live message is three frames ``[topic (utf-8), seq (8 bytes big-endian), payload]``; a
replay answer is ``[b"", topic, seq, payload]`` and ends with ``[b"", b"", seq=-1, b""]``.
The payload is msgpack ``[ts, events, data_parallel_rank]``. Each event is either a map with a
``type`` key (current vLLM) or an array ``[tag, field, ...]`` in declaration order with
trailing defaults omitted (older vLLM's ``array_like`` msgspec structs); both are accepted.
Block hashes are unsigned 64-bit ints, or bytes in some releases (their low 8 bytes are used:
the router only needs a stable per-engine key, never the engine's value).

Anything else raises ``WireError``; an unknown event type inside a valid batch is skipped and
counted in ``DecodedBatch.skipped``. Must not import asyncio, zmq, aiohttp or ``simulator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from policies.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch

__all__ = [
    "END_OF_REPLAY",
    "DecodedBatch",
    "WireError",
    "decode_live",
    "decode_payload",
    "decode_replay",
    "replay_request",
]

END_OF_REPLAY = -1

# Field order of vLLM's array-encoded events (tag first, then these).
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                  "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
                  "kv_cache_spec_sliding_window", "locality")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx", "locality")


class WireError(ValueError):
    """A message that does not follow the KV-event wire format."""


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    topic: str
    seq: int
    batch: KvEventBatch
    skipped: int = 0
    """Events of an unknown type (a newer engine) that were left out."""


def replay_request(start_seq: int) -> list[bytes]:
    """The frames a DEALER sends to ask for every buffered batch with seq >= ``start_seq``."""
    return [b"", start_seq.to_bytes(8, "big", signed=False)]


def decode_live(frames: Sequence[bytes]) -> DecodedBatch:
    if len(frames) != 3:
        raise WireError(f"expected 3 frames, got {len(frames)}")
    return _decode(frames[0], frames[1], frames[2])


def decode_replay(frames: Sequence[bytes]) -> DecodedBatch | None:
    """One replay answer; ``None`` for the end marker."""
    if len(frames) != 4 or frames[0] != b"":
        raise WireError(f"expected 4 frames starting with an empty one, got {len(frames)}")
    if len(frames[2]) == 8 and int.from_bytes(frames[2], "big", signed=True) == END_OF_REPLAY:
        return None
    return _decode(frames[1], frames[2], frames[3])


def _decode(topic_raw: bytes, seq_raw: bytes, payload: bytes) -> DecodedBatch:
    try:
        topic = topic_raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("topic is not utf-8") from exc
    if len(seq_raw) != 8:
        raise WireError(f"sequence frame has {len(seq_raw)} bytes, expected 8")
    seq = int.from_bytes(seq_raw, "big", signed=True)
    if seq < 0:
        raise WireError(f"negative sequence {seq}")
    batch, skipped = decode_payload(payload)
    return DecodedBatch(topic, seq, batch, skipped)


def decode_payload(payload: bytes) -> tuple[KvEventBatch, int]:
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(f"payload is not msgpack: {exc}") from exc
    if isinstance(raw, dict):  # a map-encoded batch, for completeness
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank", 0)]
    if not isinstance(raw, list) or len(raw) < 2:
        raise WireError("payload must be [ts, events, data_parallel_rank]")
    ts, raw_events = raw[0], raw[1]
    rank = raw[2] if len(raw) > 2 and raw[2] is not None else 0
    if not _is_number(ts) or not isinstance(raw_events, list) or not _is_int(rank):
        raise WireError("payload must be [ts: float, events: list, data_parallel_rank: int]")
    events: list[KvEvent] = []
    skipped = 0
    for raw_event in raw_events:
        event = _event(raw_event)
        if event is None:
            skipped += 1
        else:
            events.append(event)
    return KvEventBatch(float(ts), tuple(events), int(rank)), skipped


def _event(raw: Any) -> KvEvent | None:
    tag: Any
    fields: dict[str, Any]
    if isinstance(raw, list):
        if not raw or not isinstance(raw[0], str):
            raise WireError("array-encoded event must start with its type tag")
        tag, values = raw[0], raw[1:]
        names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS
        fields = dict(zip(names, values, strict=False))
    elif isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    else:
        raise WireError(f"event must be a map or an array, got {type(raw).__name__}")
    if tag == "BlockStored":
        hashes = _hashes(fields.get("block_hashes"))
        parent = fields.get("parent_block_hash")
        token_ids = fields.get("token_ids") or []
        block_size: Any = fields.get("block_size")
        # Each id's type is checked when the index packs them (a ValueError there is counted
        # as malformed too); a per-token check here would cost more than the whole rehash.
        if not isinstance(token_ids, list):
            raise WireError("BlockStored.token_ids must be a list of ints")
        # vLLM's offloading connector announces a block it copied to CPU or a store with
        # hashes only and block_size 0 (its placeholder payload); the index resolves those.
        if not _is_int(block_size) or block_size < 0 or (block_size == 0 and token_ids):
            raise WireError("BlockStored.block_size must be a positive int")
        block_size = int(block_size)
        if token_ids and len(token_ids) != len(hashes) * block_size:
            raise WireError("BlockStored.token_ids length is not blocks x block_size")
        lora_id = fields.get("lora_id")
        lora_name = fields.get("lora_name")
        return BlockStored(
            block_hashes=hashes,
            parent_block_hash=None if parent is None else _hash(parent),
            token_ids=tuple(token_ids),
            block_size=block_size,
            lora_id=lora_id if _is_int(lora_id) else None,
            medium=_medium(fields.get("medium")),
            lora_name=lora_name if isinstance(lora_name, str) else None,
            locality=_locality(fields.get("locality")),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(_hashes(fields.get("block_hashes")), _medium(fields.get("medium")),
                            _locality(fields.get("locality")))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if isinstance(tag, str):
        return None
    raise WireError("event has no type")


def _hashes(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise WireError("block_hashes must be a non-empty list")
    if all(type(h) is int and 0 <= h <= 0xFFFF_FFFF_FFFF_FFFF for h in raw):
        return tuple(raw)  # the usual case: unsigned 64-bit ints, taken as they are
    return tuple(_hash(h) for h in raw)


def _hash(raw: Any) -> int:
    if _is_int(raw):
        return int(raw) & 0xFFFF_FFFF_FFFF_FFFF
    if isinstance(raw, bytes) and raw:
        return int.from_bytes(raw[-8:], "big")
    raise WireError(f"block hash must be an int or bytes, got {type(raw).__name__}")


def _medium(raw: Any) -> str:
    return raw if isinstance(raw, str) else "GPU"


def _locality(raw: Any) -> str | None:
    return raw if isinstance(raw, str) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
