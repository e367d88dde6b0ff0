"""The index snapshot's wire format: a ``policies.kv.snapshot.IndexImage`` plus where each
engine event stream stood when it was taken, as one msgpack map.

    {"format": "kvrouter-index-snapshot", "version": 1, "replica": "<id>", "taken_at": unix_s,
     "blocks": <u64 LE bytes>,
     "backends": [{"id", "model", "positions": <u32 LE>, "tiers": <u8>,
                   "engine": <u64 LE>, "router": <u64 LE>}, ...],
     "shared": {"blocks", "engine", "router"},
     "streams": [{"backend", "topic", "rank", "next_seq", "last_ts"}, ...]}

Hashes travel as raw little-endian arrays: 8 bytes a block instead of msgpack's 9 and no
per-integer work on either side. ``next_seq`` is the next sequence number the sibling expects
from that stream (everything below it is in the image); ``last_ts`` the engine timestamp of
the last batch applied (it tells a replayed copy from a restarted engine's new batch). A
decoder skips unknown keys, so a newer sibling's extra fields do not stop an older replica.
Anything malformed raises ``SnapshotError``. Must not import asyncio, zmq or aiohttp.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack

from policies.kv.snapshot import BackendImage, IndexImage, check

__all__ = ["FORMAT", "Snapshot", "SnapshotError", "StreamPosition", "decode", "encode"]

FORMAT = "kvrouter-index-snapshot"
VERSION = 1


class SnapshotError(ValueError):
    """A snapshot that does not follow the format (or contradicts itself)."""


@dataclass(frozen=True, slots=True)
class StreamPosition:
    backend_id: str
    topic: str
    rank: int
    next_seq: int
    last_ts: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    replica: str
    taken_at_s: float
    image: IndexImage
    streams: tuple[StreamPosition, ...]


def _le(values: array[int]) -> bytes:
    if sys.byteorder == "big":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def _array(typecode: str, raw: Any, what: str) -> array[int]:
    if not isinstance(raw, bytes):
        raise SnapshotError(f"{what}: expected bytes")
    out = array(typecode)
    if len(raw) % out.itemsize:
        raise SnapshotError(f"{what}: {len(raw)} bytes is not a whole number of items")
    out.frombytes(raw)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def encode(snapshot: Snapshot) -> bytes:
    image = snapshot.image
    packed: bytes = msgpack.packb({
        "format": FORMAT, "version": VERSION, "replica": snapshot.replica,
        "taken_at": snapshot.taken_at_s,
        "blocks": _le(image.block_hashes),
        "backends": [{"id": b.backend_id, "model": b.model, "positions": _le(b.positions),
                      "tiers": b.tiers, "engine": _le(b.engine_hashes),
                      "router": _le(b.router_hashes)} for b in image.backends],
        "shared": {"blocks": _le(image.shared_blocks), "engine": _le(image.shared_engine_hashes),
                   "router": _le(image.shared_router_hashes)},
        "streams": [{"backend": s.backend_id, "topic": s.topic, "rank": s.rank,
                     "next_seq": s.next_seq, "last_ts": s.last_ts} for s in snapshot.streams],
    }, use_bin_type=True)
    return packed


def decode(data: bytes) -> Snapshot:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise SnapshotError(f"not msgpack: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SnapshotError(f"not a {FORMAT}")
    if raw.get("version") != VERSION:
        raise SnapshotError(f"version {raw.get('version')!r}, this router reads {VERSION}")
    backends = tuple(_backend(b, i) for i, b in enumerate(_list(raw.get("backends"),
                                                                  "backends")))
    shared = raw.get("shared") or {}
    if not isinstance(shared, dict):
        raise SnapshotError("shared: expected a map")
    image = IndexImage(
        _array("Q", raw.get("blocks"), "blocks"), backends,
        _array("Q", shared.get("blocks", b""), "shared.blocks"),
        _array("Q", shared.get("engine", b""), "shared.engine"),
        _array("Q", shared.get("router", b""), "shared.router"))
    try:
        check(image)
    except ValueError as exc:
        raise SnapshotError(str(exc)) from None
    streams = tuple(_stream(s, i) for i, s in enumerate(_list(raw.get("streams"), "streams")))
    replica, taken_at = raw.get("replica"), raw.get("taken_at")
    if not isinstance(replica, str) or not isinstance(taken_at, int | float):
        raise SnapshotError("replica and taken_at: expected a string and a number")
    return Snapshot(replica, float(taken_at), image, streams)


def _list(raw: Any, what: str) -> Sequence[Any]:
    if not isinstance(raw, list):
        raise SnapshotError(f"{what}: expected a list")
    return raw


def _backend(raw: Any, i: int) -> BackendImage:
    where = f"backends[{i}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        raise SnapshotError(f"{where}: expected a map with a string id")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise SnapshotError(f"{where}.model: expected a string or null")
    tiers = raw.get("tiers")
    if not isinstance(tiers, bytes):
        raise SnapshotError(f"{where}.tiers: expected bytes")
    return BackendImage(raw["id"], model, _array("I", raw.get("positions"), f"{where}.positions"),
                        tiers, _array("Q", raw.get("engine"), f"{where}.engine"),
                        _array("Q", raw.get("router"), f"{where}.router"))


def _stream(raw: Any, i: int) -> StreamPosition:
    if not isinstance(raw, dict):
        raise SnapshotError(f"streams[{i}]: expected a map")
    backend, topic, rank = raw.get("backend"), raw.get("topic"), raw.get("rank", 0)
    next_seq: Any = raw.get("next_seq")
    last_ts: Any = raw.get("last_ts")
    if not (isinstance(backend, str) and isinstance(topic, str) and _int(rank)
            and _int(next_seq) and next_seq >= 0 and isinstance(last_ts, int | float)):
        raise SnapshotError(f"streams[{i}]: expected backend, topic, rank, next_seq >= 0, "
                            "last_ts")
    return StreamPosition(backend, topic, rank, next_seq, float(last_ts))


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
