"""The replica-sync wire format: one msgpack array per ZeroMQ message.

    ["d", origin, seq, sent_at_unix_s, request_seq, {RouteRequest fields}, {Decision fields}]
    ["f", origin, seq, sent_at_unix_s, request_seq, ok]
    ["h", origin, seq, sent_at_unix_s, next_request_seq, [[request_seq, backend, tokens], ...]]

Dataclasses travel as maps of their fields, so a field added on one side is ignored by an
older peer and a field it lacks takes its default: replicas of neighbouring versions keep
syncing through a rolling update. Times on the wire are the sender's wall clock (monotonic
clocks of two processes share no origin); ``decode`` turns them into the receiver's
monotonic time, so ``now - sent_at_s`` is the sync lag (including clock skew between hosts).
Anything malformed raises ``WireError``. Must not import other ``router`` modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from policies.replica_sync import Dispatch, Finish, Heartbeat, Message
from policies.types import BackendScore, Decision, DecodeEstimate, Prediction, RouteRequest

__all__ = ["WireError", "decode", "encode"]


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
    elif isinstance(message, Finish):
        body = ["f", *head, message.request_seq, message.ok]
    else:
        body = ["h", *head, message.next_request_seq, [list(x) for x in message.in_flight]]
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


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
    if not isinstance(body, list) or len(body) < 5 or body[0] not in ("d", "f", "h"):
        raise WireError("expected [kind, origin, seq, sent_at, ...]")
    kind, origin, seq, sent_unix_s = body[0], body[1], body[2], body[3]
    if not isinstance(origin, str) or not isinstance(seq, int) or not isinstance(
            sent_unix_s, int | float) or not isinstance(body[4], int):
        raise WireError("bad header types")
    sent_at_s = monotonic_now_s - (unix_now_s - float(sent_unix_s))
    if kind == "h":
        if len(body) != 6 or not isinstance(body[5], list) or not all(
                isinstance(x, list) and len(x) == 3 and isinstance(x[0], int)
                and isinstance(x[1], str) and isinstance(x[2], int) for x in body[5]):
            raise WireError("heartbeat: expected 6 fields, the last [[seq, backend, tokens]...]")
        return Heartbeat(origin, seq, sent_at_s, body[4],
                         tuple((x[0], x[1], x[2]) for x in body[5]))
    if kind == "f":
        if len(body) != 6:
            raise WireError("finish: expected 6 fields")
        return Finish(origin, seq, sent_at_s, body[4], bool(body[5]))
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
