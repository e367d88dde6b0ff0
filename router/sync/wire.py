"""The replica-sync wire format: msgpack, one message per ZeroMQ frame or one batch per frame.

One message per frame (every version reads it):

    ["d", origin, seq, sent_at_unix_s, request_seq, {RouteRequest fields}, {Decision fields}]
    ["s", origin, seq, sent_at_unix_s, dispatches, [[backend, requests, tokens], ...], shared]

``shared`` is the sender's policy's shared state (a map of backend -> numbers) or nil.

Dataclasses travel as maps of their fields, so a field added on one side is ignored by an
older peer and a field it lacks takes its default: replicas of neighbouring versions keep
syncing through a rolling update.

A batch per frame (``encode_batch``; ``sync.batch_frames``, on for ``serve --workers``):

    ["b", 2, origin, {class: [field names]}, [[block hashes], ...], [entry, ...]]
    entry: ["d", seq, sent_at_unix_s, request_seq, [RouteRequest values], [Decision values]]
           ["s", seq, sent_at_unix_s, dispatches, [[backend, requests, tokens], ...], shared]

The field names travel once per batch, and values in that order: a receiver whose classes
have the same fields builds them positionally, and otherwise by name (a field it lacks is
dropped, one the sender lacks takes its default), as with maps. A request's
``block_hashes`` is an index into the batch's list of chains, so a hot prompt's chain
travels and is decoded once per batch and its dispatches share one tuple. A whole batch in
one frame is one ZeroMQ message part instead of one per message: with 11 messages of 1.2 KB
a send and its receipt took 36 against 7 us on this machine. ``decode_frame`` reads both
forms; an older replica reads only the first (the batch is one undecodable frame to it), so
senders turn batches on once every replica reads them (the ``2`` is the batch's version).

Version 2 (states instead of finishes and heartbeats, ``policies.replica_sync``) is not read
by replicas of version 1, nor theirs by it: "f" and "h" messages are undecodable here (counted,
skipped). Through a rolling update across it, old and new replicas route blind to each
other's traffic until the last old one is gone, as unsynced replicas do. Times on the wire are the sender's wall clock (monotonic
clocks of two processes share no origin); ``decode`` turns them into the receiver's
monotonic time, so ``now - sent_at_s`` is the sync lag (including clock skew between hosts).
Anything malformed raises ``WireError``. Must not import other ``router`` modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import msgpack
from msgpack.exceptions import UnpackException

from policies.replica_sync import Dispatch, Message, State
from policies.types import BackendScore, Decision, DecodeEstimate, Prediction, RouteRequest

__all__ = ["BATCH_VERSION", "WireError", "decode", "decode_frame", "encode", "encode_batch"]


class WireError(ValueError):
    """A sync message that cannot be decoded."""


_NAMES: dict[type, tuple[str, ...]] = {}  # field names per dataclass, looked up once


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in _names(type(value))}


def encode(message: Message, *, monotonic_now_s: float, unix_now_s: float,
           prompt_text: bool = True) -> bytes:
    sent_unix_s = unix_now_s - (monotonic_now_s - message.sent_at_s)
    head = [message.origin, message.seq, sent_unix_s]
    if isinstance(message, Dispatch):
        request = _fields(message.request)
        if not prompt_text:
            request["prompt_text"] = ""
        decision = _fields(message.decision)
        decision["scores"] = [_score_fields(s) for s in message.decision.scores]
        body: list[Any] = ["d", *head, message.request_seq, request, decision]
    else:
        body = ["s", *head, message.dispatches, [list(x) for x in message.load],
                _shared_out(message)]
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _shared_out(state: State) -> dict[str, list[float]] | None:
    shared = state.shared
    return None if shared is None else {b: list(x) for b, x in shared.items()}


def _state(origin: str, seq: int, sent_at_s: float, dispatches: int, load: object,
           shared: object) -> State:
    if not isinstance(load, list) or not all(
            isinstance(x, list) and len(x) == 3 and isinstance(x[0], str)
            and isinstance(x[1], int) and isinstance(x[2], int) for x in load):
        raise WireError("state: expected [[backend, requests, tokens]...]")
    if shared is not None and not (isinstance(shared, dict) and all(
            isinstance(b, str) and isinstance(x, list) for b, x in shared.items())):
        raise WireError("state: shared: expected a map of backend -> [numbers] or nil")
    return State(origin, seq, sent_at_s, dispatches, tuple((x[0], x[1], x[2]) for x in load),
                 shared)


def _score_fields(score: BackendScore) -> dict[str, Any]:
    # The typed parts a peer's policy reads back (kv_aware's on_dispatched reads prediction).
    return _fields(score) | {
        "terms": dict(score.terms),
        "prediction": None if score.prediction is None else _fields(score.prediction),
        "decode": None if score.decode is None else _fields(score.decode),
    }


def _build_score(raw: object) -> BackendScore:
    if not isinstance(raw, dict):
        raise WireError("decision.scores: expected a map")
    raw = dict(raw)
    for name, cls in (("prediction", Prediction), ("decode", DecodeEstimate)):
        if raw.get(name) is not None:
            raw[name] = _build(cls, raw[name], f"decision.scores.{name}")
    return _build(BackendScore, raw, "decision.scores")  # type: ignore[no-any-return]


def _build(cls: type[Any], raw: object, what: str) -> Any:
    if not isinstance(raw, dict):
        raise WireError(f"{what}: expected a map")
    known = _names(cls)
    try:
        return cls(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise WireError(f"{what}: {exc}") from None


def decode(data: bytes, *, monotonic_now_s: float, unix_now_s: float) -> Message:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"not msgpack: {exc}") from None
    if not isinstance(body, list) or len(body) < 5 or body[0] not in ("d", "s"):
        raise WireError("expected [kind, origin, seq, sent_at, ...]")
    kind, origin, seq, sent_unix_s = body[0], body[1], body[2], body[3]
    if not isinstance(origin, str) or not isinstance(seq, int) or not isinstance(
            sent_unix_s, int | float) or not isinstance(body[4], int):
        raise WireError("bad header types")
    sent_at_s = monotonic_now_s - (unix_now_s - float(sent_unix_s))
    if kind == "s":
        if len(body) != 7:
            raise WireError("state: expected 7 fields")
        return _state(origin, seq, sent_at_s, body[4], body[5], body[6])
    if len(body) != 7 or not isinstance(body[6], dict):
        raise WireError("dispatch: expected 7 fields")
    raw_request = dict(body[5]) if isinstance(body[5], dict) else body[5]
    if isinstance(raw_request, dict):
        raw_request["block_hashes"] = tuple(raw_request.get("block_hashes") or ())
    request = _build(RouteRequest, raw_request, "request")
    raw_decision = dict(body[6])
    scores = raw_decision.get("scores") or []
    if not isinstance(scores, list):
        raise WireError("decision.scores: expected a list")
    raw_decision["scores"] = tuple(_build_score(s) for s in scores)
    decision = _build(Decision, raw_decision, "decision")
    if not isinstance(request.prompt_tokens, int) or not isinstance(decision.backend_id, str):
        raise WireError("request.prompt_tokens / decision.backend_id: bad types")
    return Dispatch(origin, seq, sent_at_s, body[4], request, decision)


# ---- a batch per frame ------------------------------------------------------------------------

BATCH_VERSION = 2
# The classes a batch carries, by the key of their field names in the batch's header.
_CLASSES: dict[str, type] = {"request": RouteRequest, "decision": Decision, "score": BackendScore,
                             "prediction": Prediction, "decode": DecodeEstimate}
_HEADER = {key: list(_names(cls)) for key, cls in _CLASSES.items()}
# attrgetter of several names returns their values as one tuple, in C: no per-field Python.
_GET = {key: attrgetter(*names) for key, names in _HEADER.items()}
_REQUEST_AT = {name: i for i, name in enumerate(_HEADER["request"])}
_SCORE_AT = {name: i for i, name in enumerate(_HEADER["score"])}
_SCORES_AT = _HEADER["decision"].index("scores")
# A batch's first two elements and its header are the same in every batch: packed once (a
# msgpack array's elements are its elements' encodings one after another).
_BATCH_OPEN = b"\x96" + msgpack.packb("b") + msgpack.packb(BATCH_VERSION)
_HEADER_BYTES: bytes = msgpack.packb(_HEADER, use_bin_type=True)


def encode_batch(messages: Sequence[Message], *, monotonic_now_s: float, unix_now_s: float,
                 prompt_text: bool = True) -> bytes:
    """``messages`` (one origin's, at least one) as one frame; see the module docstring."""
    chains: dict[tuple[int, ...], int] = {}  # a chain -> its index, equal chains sent once
    get_request, get_decision = _GET["request"], _GET["decision"]
    hashes_at, text_at = _REQUEST_AT["block_hashes"], _REQUEST_AT["prompt_text"]
    stream_at = _REQUEST_AT["stream"]
    entries: list[list[Any]] = []
    for message in messages:
        sent_unix_s = unix_now_s - (monotonic_now_s - message.sent_at_s)
        if isinstance(message, Dispatch):
            request = message.request
            values = list(get_request(request))
            at = chains.get(request.block_hashes)
            if at is None:
                at = chains[request.block_hashes] = len(chains)
            values[hashes_at] = at
            if not prompt_text:
                values[text_at] = ""
            # A peer replays the dispatch as a whole answer (its first token is heard only
            # here): sent so, the receiver need not copy the request to say it (1.5 us).
            values[stream_at] = False
            decision = list(get_decision(message.decision))
            decision[_SCORES_AT] = [_score_values(s) for s in message.decision.scores]
            entries.append(["d", message.seq, sent_unix_s, message.request_seq, values, decision])
        else:
            entries.append(["s", message.seq, sent_unix_s, message.dispatches,
                            [list(x) for x in message.load], _shared_out(message)])
    pack = msgpack.packb
    return b"".join((_BATCH_OPEN, pack(messages[0].origin, use_bin_type=True), _HEADER_BYTES,
                     pack(list(chains)), pack(entries, use_bin_type=True)))


def _score_values(score: BackendScore) -> list[Any]:
    values = list(_GET["score"](score))
    values[_SCORE_AT["terms"]] = dict(score.terms)
    if score.prediction is not None:
        values[_SCORE_AT["prediction"]] = _GET["prediction"](score.prediction)
    if score.decode is not None:
        values[_SCORE_AT["decode"]] = _GET["decode"](score.decode)
    return values


class _Builder:
    """Builds one class from values in a sender's field order: positionally when the sender's
    fields are this replica's, else by name (unknown names dropped, missing ones defaulted)."""

    def __init__(self, cls: type[Any], sent: object, what: str) -> None:
        if not isinstance(sent, list) or not all(isinstance(n, str) for n in sent):
            raise WireError(f"batch header: {what}: expected a list of field names")
        self.cls, self.sent, self.what = cls, sent, what
        own = _names(cls)
        self.positional = tuple(sent) == own
        self.known = frozenset(own)
        self.at = {name: i for i, name in enumerate(sent)}
        # (position, builder) of the fields that are classes themselves (a score's prediction)
        self.nested: tuple[tuple[int, _Builder], ...] = ()

    def build(self, values: object) -> Any:
        if not isinstance(values, list) or len(values) != len(self.sent):
            raise WireError(f"{self.what}: expected {len(self.sent)} values")
        try:
            if self.positional:
                return self.cls(*values)
            return self.cls(**{n: v for n, v in zip(self.sent, values, strict=True)
                               if n in self.known})
        except TypeError as exc:
            raise WireError(f"{self.what}: {exc}") from None


# A sender's header is the same bytes in every batch it sends, so the builders made from it
# are kept by those bytes: making five builders per frame was a fifth of a batch's decode.
# Bounded, since the bytes come from the network (a header past the bound is built each time).
_BUILT: dict[bytes, dict[str, _Builder]] = {}
_BUILT_MAX = 64
_DECODE_ERRORS = (ValueError, UnpackException)  # msgpack's: truncated, malformed, too deep, ...


def _builders(header_bytes: bytes) -> dict[str, _Builder]:
    built = _BUILT.get(header_bytes)
    if built is None:
        header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=False)
        if not isinstance(header, dict):
            raise WireError("batch: expected a map of field names")
        built = {key: _Builder(cls, header.get(key), key) for key, cls in _CLASSES.items()}
        score = built["score"]
        score.nested = tuple((at, built[name]) for name in ("prediction", "decode")
                             if (at := score.at.get(name)) is not None)
        if len(_BUILT) < _BUILT_MAX:
            _BUILT[header_bytes] = built
    return built


def decode_frame(data: bytes, *, monotonic_now_s: float, unix_now_s: float) -> list[Message]:
    """The messages in one frame: a batch, or one message (``decode``)."""
    if data[:3] != b"\x96\xa1b":  # msgpack: not an array of 6 opening with the string "b"
        return [decode(data, monotonic_now_s=monotonic_now_s, unix_now_s=unix_now_s)]
    # Read element by element to find the header's bytes (``tell``) without decoding them.
    # The frame's own length bounds the buffer and the sizes inside it, as unpackb's do.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data))
    try:
        unpacker.feed(data)
        unpacker.read_array_header()
        unpacker.skip()  # "b"
        version, origin = unpacker.unpack(), unpacker.unpack()
        if not isinstance(version, int) or version != BATCH_VERSION:
            raise WireError(f"batch version {version!r}: this replica reads {BATCH_VERSION}")
        start = unpacker.tell()
        unpacker.skip()
        built = _builders(data[start:unpacker.tell()])
        raw_chains, entries = unpacker.unpack(), unpacker.unpack()
        if unpacker.tell() != len(data):
            raise WireError("batch: extra data after its six elements")
    except WireError:
        raise  # (a ValueError too: not to be reworded as undecodable msgpack below)
    except _DECODE_ERRORS as exc:
        raise WireError(f"not msgpack: {exc}") from None
    if not isinstance(origin, str) or not isinstance(raw_chains, list) or not isinstance(
            entries, list):
        raise WireError("batch: expected [\"b\", version, origin, {names}, [chains], [entries]]")
    chains = [tuple(c) for c in raw_chains if isinstance(c, list)]
    if len(chains) != len(raw_chains):
        raise WireError("batch: chains: expected lists of block hashes")
    out: list[Message] = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) < 5:
            raise WireError("batch entry: expected [kind, seq, sent_at, number, ...]")
        kind, seq, sent_unix_s, number = entry[0], entry[1], entry[2], entry[3]
        if not isinstance(seq, int) or not isinstance(sent_unix_s, int | float) or not isinstance(
                number, int):
            raise WireError("batch entry: bad header types")
        sent_at_s = monotonic_now_s - (unix_now_s - float(sent_unix_s))
        if kind == "d" and len(entry) == 6:
            out.append(Dispatch(origin, seq, sent_at_s, number,
                                _batch_request(built, chains, entry[4]),
                                _batch_decision(built, entry[5])))
        elif kind == "s" and len(entry) == 6:
            out.append(_state(origin, seq, sent_at_s, number, entry[4], entry[5]))
        else:
            raise WireError(f"batch entry: unknown kind {kind!r} or wrong length")
    return out


def _batch_request(built: dict[str, _Builder], chains: list[tuple[int, ...]],
                   values: object) -> RouteRequest:
    builder = built["request"]
    at = builder.at.get("block_hashes")
    if at is not None and isinstance(values, list) and len(values) > at:
        index = values[at]
        if not isinstance(index, int) or not 0 <= index < len(chains):
            raise WireError("request.block_hashes: expected an index into the batch's chains")
        values[at] = chains[index]
    request: RouteRequest = builder.build(values)
    if not isinstance(request.prompt_tokens, int):
        raise WireError("request.prompt_tokens: bad type")
    return request


def _batch_decision(built: dict[str, _Builder], values: object) -> Decision:
    builder, score = built["decision"], built["score"]
    at = builder.at.get("scores")
    if at is not None and isinstance(values, list) and len(values) > at:
        scores = values[at]
        if not isinstance(scores, list):
            raise WireError("decision.scores: expected a list")
        values[at] = tuple(_batch_score(built, score, s) for s in scores)
    decision: Decision = builder.build(values)
    if not isinstance(decision.backend_id, str):
        raise WireError("decision.backend_id: bad type")
    return decision


def _batch_score(built: dict[str, _Builder], builder: _Builder, values: object) -> BackendScore:
    if isinstance(values, list) and len(values) == len(builder.sent):
        for at, nested in builder.nested:
            if values[at] is not None:
                values[at] = nested.build(values[at])
    return builder.build(values)  # type: ignore[no-any-return]
