"""Live trace replay: drive any OpenAI-compatible endpoint open-loop at a trace's arrival times.

The async client of ``kvrouter replay``. Each request is sent at ``arrival_s / speedup`` after
the start whatever happened to earlier ones (open loop), streaming, and timed from the client:
time to the first content chunk (TTFT), gaps between content chunks (inter-token latency),
end to end. The engine's own ``usage.prompt_tokens_details.cached_tokens`` (vLLM, the emulator)
gives the hit rate; ``x-kvrouter-backend`` (the router's response header) gives the per-backend
split. Results go through the same ``RunMetrics`` and report as simulated runs.

Prompts: text and token-id traces are sent as they are. Hash-only traces (Mooncake) become
token ids deterministically: block key ``k`` -> ``block_size`` pseudo-random ids of the
tokenizer's vocabulary seeded by ``k``, so equal leading keys give equal leading tokens and
a shared block is shared by the engines too. Must not import ``router``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from simulator.results import PooledLruOracle, RunMetrics
from simulator.traces import TraceRequest

__all__ = ["ReplayConfig", "TokenBlocks", "error_message", "grouped_errors", "replay"]


class TokenBlocks:
    """Hash-only prompt -> token ids: each block key maps to its own fixed token block."""

    def __init__(self, vocab_size: int, first_id: int = 0, seed: int = 0) -> None:
        if vocab_size <= first_id:
            raise ValueError("vocab_size must exceed first_id")
        self.vocab_size = vocab_size
        self.first_id = first_id
        self.seed = seed
        self._cache: dict[tuple[int, int], list[int]] = {}

    def block(self, key: int, size: int) -> list[int]:
        cached = self._cache.get((key, size))
        if cached is None:
            rng = random.Random(f"{self.seed}:{key}")
            cached = [rng.randrange(self.first_id, self.vocab_size) for _ in range(size)]
            if len(self._cache) < 100_000:
                self._cache[(key, size)] = cached
        return cached

    def tokens(self, request: TraceRequest) -> list[int]:
        out: list[int] = []
        for key in request.hash_ids:
            out.extend(self.block(key, request.block_size))
        return out[: request.input_tokens]


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    target: str
    model: str
    speedup: float = 1.0
    timeout_s: float = 600.0
    slo_ttft_s: float = 2.0
    latency_scale: float = 1.0
    """Multiplies measured durations (set to an emulator's time scale to read virtual seconds)."""
    session_header: str = "x-session-id"
    ignore_eos: bool = True
    cache_blocks: int = 1 << 40
    """Pooled capacity of the oracle, in trace blocks (default: unbounded)."""


@dataclass(slots=True)
class _Outcome:
    ok: bool
    ttft_s: float
    e2e_s: float
    gaps_s: list[float]
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    backend: str | None
    error: str = ""


def _body(
    request: TraceRequest, config: ReplayConfig, blocks: TokenBlocks
) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": max(request.output_tokens, 1),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if request.messages is not None:
        body["messages"] = list(request.messages)
        return "/v1/chat/completions", body
    if request.text is not None:
        body["prompt"] = request.text
    elif request.token_ids is not None:
        body["prompt"] = list(request.token_ids)
    else:
        body["prompt"] = blocks.tokens(request)
    return "/v1/completions", body


def _content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def _send(
    session: aiohttp.ClientSession, request: TraceRequest, config: ReplayConfig, blocks: TokenBlocks
) -> _Outcome:
    path, body = _body(request, config, blocks)
    headers = {config.session_header: request.session_id} if request.session_id else {}
    started = time.monotonic()
    first = last = 0.0
    gaps: list[float] = []
    chunks = 0
    usage: dict[str, Any] = {}
    backend = None
    try:
        async with session.post(
            config.target.rstrip("/") + path, json=body, headers=headers
        ) as resp:
            backend = resp.headers.get("x-kvrouter-backend")
            if resp.status != 200:
                message = error_message(await resp.text())
                return _Outcome(False, 0, 0, [], 0, 0, 0, backend, f"HTTP {resp.status}: {message}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if _content(chunk):
                    now = time.monotonic()
                    if chunks == 0:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    chunks += 1
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        return _Outcome(False, 0, 0, [], 0, 0, 0, backend, f"{exc.__class__.__name__}: {exc}")
    end = time.monotonic()
    if chunks == 0:
        return _Outcome(False, 0, 0, [], 0, 0, 0, backend, "stream carried no tokens")
    details = usage.get("prompt_tokens_details") or {}
    return _Outcome(
        ok=True,
        ttft_s=first - started,
        e2e_s=end - started,
        gaps_s=gaps,
        output_tokens=int(usage.get("completion_tokens") or chunks),
        prompt_tokens=int(usage.get("prompt_tokens") or request.input_tokens),
        cached_tokens=int(details.get("cached_tokens") or 0),
        backend=backend,
    )


def error_message(body: str) -> str:
    """The one line worth grouping from an error body: the first sentence of OpenAI's
    ``error.message`` (vLLM, SGLang, the router, the emulator), FastAPI's ``detail``, else of
    the text."""
    text = body.strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
        elif isinstance(error, str):
            text = error
        elif data.get("message") or data.get("detail"):
            text = str(data.get("message") or data.get("detail"))
    text = " ".join(text.split())
    # The first sentence names the problem; later ones carry per-request numbers ("However, you
    # requested 9405 tokens ...") that would give every request a group of its own.
    head, sep, _rest = text.partition(". ")
    text = head + "." if sep else text
    return text[:160] + ("..." if len(text) > 160 else "") if text else "(empty body)"


def grouped_errors(errors: Mapping[str, int]) -> list[str]:
    """``HTTP 400 x19: maximum context length is 8192 tokens``, most frequent first."""
    lines = []
    for reason, count in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0])):
        head, sep, message = reason.partition(": ")
        lines.append(f"{head} x{count}: {message}" if sep else f"{reason} x{count}")
    return lines


async def replay(
    requests: Iterable[TraceRequest],
    config: ReplayConfig,
    blocks: TokenBlocks,
    label: str = "replay",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay ``requests`` against ``config.target``; the summary in ``results.json`` shape."""
    scale = config.latency_scale
    metrics = RunMetrics(label, 1, config.slo_ttft_s)
    oracle = PooledLruOracle(config.cache_blocks)
    per_backend: dict[str, float] = {}
    errors: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    sent = done = 0
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)

    # The oracle sees the prompts the target accepted, in arrival order: a prompt it refused
    # (too long, bad request) was never cached by any engine, and counting it would compare
    # the hit rate of the accepted requests with an oracle over a different set. Outcomes that
    # finish out of order wait here until every earlier request has finished (bounded by the
    # requests in flight).
    resolved: dict[int, tuple[TraceRequest, bool]] = {}
    next_seq = 0

    def feed_oracle(seq: int, request: TraceRequest, ok: bool) -> None:
        nonlocal next_seq
        resolved[seq] = (request, ok)
        while next_seq in resolved:
            earlier, accepted = resolved.pop(next_seq)
            if accepted:
                oracle.observe(earlier.full_blocks, earlier.block_size, earlier.input_tokens)
            next_seq += 1

    async def one(seq: int, request: TraceRequest, session: aiohttp.ClientSession) -> None:
        nonlocal done
        outcome = await _send(session, request, config, blocks)
        done += 1
        feed_oracle(seq, request, outcome.ok)
        if outcome.ok:
            # Timestamps in (scaled) seconds from this request's send: arrival 0.
            metrics.on_finished(
                0.0,
                outcome.ttft_s * scale,
                outcome.e2e_s * scale,
                outcome.prompt_tokens,
                outcome.cached_tokens,
                outcome.output_tokens,
            )
            for gap in outcome.gaps_s:
                metrics.on_token_gap(gap * scale)
            key = outcome.backend or "target"
            per_backend[key] = per_backend.get(key, 0.0) + outcome.e2e_s * scale
        else:
            metrics.on_failed()
            # Distinct messages are bounded: a server that puts ids in its errors cannot
            # grow this without limit.
            key = outcome.error if outcome.error in errors or len(errors) < 50 else "other"
            errors[key] = errors.get(key, 0) + 1
        if progress is not None:
            progress(done, sent)

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for request in requests:
            delay = started + request.arrival_s / config.speedup - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            metrics.on_arrival(0.0)
            task = asyncio.create_task(one(sent, request, session))
            sent += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    wall_s = time.monotonic() - started
    summary = metrics.summary(oracle)
    loads = list(per_backend.values())
    mean = sum(loads) / len(loads) if loads else 0.0
    xs, ys = metrics.ttft_cdf()
    summary.update(
        backends=len(per_backend),
        arrived=sent,
        # From the client, a backend's busy time is approximated by the request-seconds it served.
        imbalance=max(loads) / mean if mean > 0 else 1.0,
        busy_s=loads,
        routed_by_backend={k: round(v, 3) for k, v in sorted(per_backend.items())},
        throughput_rps=metrics.finished / (wall_s * scale) if wall_s else 0.0,
        goodput_rps=metrics.within_slo / (wall_s * scale) if wall_s else 0.0,
        errors=errors,
        # Engine time spent on prefill is invisible to a client: unknown, not zero.
        prefill_gpu_s=None,
        target=config.target,
        speedup=config.speedup,
        latency_scale=scale,
        wall_s=wall_s,
        ttft_cdf={"s": xs, "ratio": ys},
    )
    return summary
