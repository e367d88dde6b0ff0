"""Trace formats: what arrives when, how long it is, and which prompt prefixes it shares.

Every loader streams ``TraceRequest`` values in arrival order (files are never held whole, so a
million-request trace costs constant memory). A request's prompt is described at block level:
``hash_ids`` are CHAINED block keys (equal key = equal prefix up to and including that block),
one per ``block_size`` tokens, the last one possibly covering a partial block. Formats:

- Mooncake (FAST'25): ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``, 512-token
  blocks. The real trace is quantised (~3 s); arrivals that share a timestamp are spread evenly
  over the step to the next distinct timestamp.
- kvrouter JSONL (documented in docs/simulation.md): ``arrival_s``, ``output_tokens``, one of
  ``text`` / ``messages`` / ``token_ids`` / ``hash_ids`` (+ ``input_tokens``, ``block_size``),
  optional ``session_id``, ``request_id``.
- Azure LLM inference CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``): arrivals and lengths
  only; every prompt is unique (no prefix information in the source).

Text and token prompts are tokenized by a caller-supplied function and hashed here with the
router's own chained xxh3 scheme (``policies.kv.hashing``). Must not import ``router``; no clock, no global RNG.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import xxhash

from policies.kv.hashing import BlockHasher, Namespace, pack_tokens

__all__ = [
    "MOONCAKE_BLOCK_SIZE",
    "SIM_MODEL",
    "Tokenize",
    "TraceError",
    "TraceRequest",
    "chain_block_keys",
    "load_azure_csv",
    "load_jsonl",
    "load_mooncake",
    "open_trace_file",
    "sniff_format",
]

MOONCAKE_BLOCK_SIZE = 512
SIM_MODEL = "kvrouter-sim"
"""The model name traces are hashed under when they name none."""
Tokenize = Callable[[Any], list[int]]
"""Turns a ``text`` string or a ``messages`` list into token ids (chat template applied)."""


class TraceError(ValueError):
    """A trace line is malformed; the message names the file, line and field."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace. ``hash_ids`` has ``ceil(input_tokens / block_size)`` entries."""

    request_id: str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]
    block_size: int
    session_id: str | None = None
    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    token_ids: tuple[int, ...] | None = None

    @property
    def full_blocks(self) -> tuple[int, ...]:
        """Keys of the prompt's FULL blocks: the only ones an engine can cache and reuse."""
        return self.hash_ids[: self.input_tokens // self.block_size]


def chain_block_keys(
    token_ids: Sequence[int], block_size: int, model: str = SIM_MODEL
) -> tuple[int, ...]:
    """Keys of every block, the last possibly partial. Full blocks use the router's own
    ``policies.kv.hashing`` scheme, so simulated and live indexes agree on token traces."""
    hasher = BlockHasher(Namespace(model=model), block_size)
    keys = hasher.hash_tokens(token_ids)
    tail = token_ids[len(keys) * block_size :]
    if tail:
        # A partial block is never cached; its key only keeps ``hash_ids`` one per block.
        keys += (xxhash.xxh3_64_intdigest(pack_tokens(tail), keys[-1] if keys else hasher.root),)
    return keys


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def sniff_format(path: Path) -> str:
    """``mooncake``, ``jsonl`` or ``azure`` from the file's first record."""
    with _open_text(path) as f:
        first = f.readline().strip()
    if first.upper().startswith("TIMESTAMP,"):
        return "azure"
    try:
        record = json.loads(first) if first else {}
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:1: neither JSON lines nor an Azure CSV ({exc.msg})") from None
    if isinstance(record, dict) and "timestamp" in record and "hash_ids" in record:
        return "mooncake"
    return "jsonl"


def open_trace_file(path: Path, tokenize: Tokenize | None = None) -> Iterator[TraceRequest]:
    """Stream a trace file of any supported format (detected from its first record)."""
    kind = sniff_format(path)
    if kind == "mooncake":
        return load_mooncake(path)
    if kind == "azure":
        return load_azure_csv(path)
    return load_jsonl(path, tokenize)


def _field(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in record:
        raise TraceError(f"{where}: missing field {key!r}")
    value = record[key]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is not float and kind is not int and isinstance(value, kind):
        return value
    raise TraceError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")


def _hash_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TraceError(f"{where}: field 'hash_ids' must be a list of integers")
    return tuple(value)


def load_mooncake(path: Path) -> Iterator[TraceRequest]:
    """Stream a Mooncake trace, spreading each group of equal timestamps over its step."""
    group: list[tuple[int, int, int, tuple[int, ...]]] = []
    group_ts = 0
    last_step_ms = 0
    index = 0

    def flush(step_ms: int) -> Iterator[TraceRequest]:
        nonlocal index
        for i, (_line, inp, out, ids) in enumerate(group):
            arrival_ms = group_ts + step_ms * i / len(group)
            yield TraceRequest(
                request_id=f"r{index}",
                arrival_s=arrival_ms / 1000.0,
                input_tokens=inp,
                output_tokens=out,
                hash_ids=ids,
                block_size=MOONCAKE_BLOCK_SIZE,
            )
            index += 1

    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: invalid JSON ({exc.msg})") from None
            ts = _field(record, "timestamp", int, where)
            inp = _field(record, "input_length", int, where)
            out = _field(record, "output_length", int, where)
            ids = _hash_list(record.get("hash_ids"), where)
            if len(ids) != -(-inp // MOONCAKE_BLOCK_SIZE):
                raise TraceError(
                    f"{where}: {len(ids)} hash_ids for input_length {inp} "
                    f"(expected ceil({inp}/{MOONCAKE_BLOCK_SIZE}))"
                )
            if group and ts != group_ts:
                if ts < group_ts:
                    raise TraceError(f"{where}: timestamp {ts} goes back in time")
                last_step_ms = ts - group_ts
                yield from flush(last_step_ms)
                group = []
            group_ts = ts
            group.append((line_no, inp, out, ids))
    if group:
        yield from flush(last_step_ms)


def load_jsonl(path: Path, tokenize: Tokenize | None = None) -> Iterator[TraceRequest]:
    """Stream the project's JSONL trace format (see docs/simulation.md)."""
    previous_s = float("-inf")
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise TraceError(f"{where}: expected a JSON object")
            request = parse_jsonl_record(record, line_no - 1, where, tokenize)
            if request.arrival_s < previous_s:
                raise TraceError(f"{where}: arrival_s {request.arrival_s} goes back in time")
            previous_s = request.arrival_s
            yield request


def parse_jsonl_record(
    record: dict[str, Any], index: int, where: str, tokenize: Tokenize | None
) -> TraceRequest:
    """One JSONL record -> TraceRequest; exactly one prompt field must be present."""
    arrival_s = _field(record, "arrival_s", float, where)
    output_tokens = _field(record, "output_tokens", int, where)
    block_size = _field(record, "block_size", int, where) if "block_size" in record else 16
    if block_size <= 0 or output_tokens < 0 or arrival_s < 0:
        raise TraceError(f"{where}: block_size must be > 0, output_tokens and arrival_s >= 0")
    session = record.get("session_id")
    if session is not None and not isinstance(session, str):
        raise TraceError(f"{where}: field 'session_id' must be a string")
    request_id = str(record.get("request_id", f"r{index}"))
    prompt_keys = [k for k in ("text", "messages", "token_ids", "hash_ids") if k in record]
    if len(prompt_keys) != 1:
        raise TraceError(
            f"{where}: exactly one of text, messages, token_ids, hash_ids is required "
            f"(found {prompt_keys or 'none'})"
        )
    key = prompt_keys[0]
    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    tokens: tuple[int, ...] | None = None
    if key == "hash_ids":
        ids = _hash_list(record["hash_ids"], where)
        input_tokens = _field(record, "input_tokens", int, where)
        if len(ids) != -(-input_tokens // block_size):
            raise TraceError(f"{where}: {len(ids)} hash_ids for input_tokens {input_tokens}")
    else:
        if key == "text":
            text = _field(record, "text", str, where)
            source: Any = text
        elif key == "messages":
            raw = record["messages"]
            if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
                raise TraceError(f"{where}: field 'messages' must be a list of objects")
            messages = tuple(raw)
            source = raw
        else:
            tokens = _hash_list(record["token_ids"], where)
        if tokens is None:
            if tokenize is None:
                raise TraceError(f"{where}: a {key!r} prompt needs a tokenizer")
            tokens = tuple(tokenize(source))
        input_tokens = len(tokens)
        ids = chain_block_keys(tokens, block_size)

    return TraceRequest(
        request_id=request_id,
        arrival_s=arrival_s,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        hash_ids=ids,
        block_size=block_size,
        session_id=session,
        text=text,
        messages=messages,
        token_ids=tokens,
    )


def load_azure_csv(path: Path, block_size: int = 16) -> Iterator[TraceRequest]:
    """Stream an Azure LLM inference CSV; each prompt gets its own never-shared block keys."""
    next_key = -1
    start: datetime | None = None
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != [
            "TIMESTAMP",
            "ContextTokens",
            "GeneratedTokens",
        ]:
            raise TraceError(f"{path}:1: expected header TIMESTAMP,ContextTokens,GeneratedTokens")
        for row_no, row in enumerate(reader, 2):
            where = f"{path}:{row_no}"
            try:
                # Seven fractional digits do not parse with %f; microseconds are plenty.
                stamp, _, frac = row[0].partition(".")
                when = datetime.strptime(f"{stamp}.{(frac + '000000')[:6]}", "%Y-%m-%d %H:%M:%S.%f")
                inp, out = int(row[1]), int(row[2])
            except (ValueError, IndexError):
                raise TraceError(f"{where}: malformed row {row!r}") from None
            start = start or when
            n_blocks = -(-inp // block_size)
            # Negative keys never collide with hashed (non-negative) keys from other sources.
            ids = tuple(range(next_key, next_key - n_blocks, -1))
            next_key -= n_blocks
            yield TraceRequest(
                request_id=f"r{row_no - 2}",
                arrival_s=(when - start).total_seconds(),
                input_tokens=inp,
                output_tokens=out,
                hash_ids=ids,
                block_size=block_size,
            )
