"""The emulator's general answer path: ``n`` choices, ``logprobs`` and a forced named tool call,
in vLLM's response shapes, streamed or whole.

Async (aiohttp); used by ``simulator.emulator.http`` for requests its fast path (one choice, no
logprobs, no forced tool) does not take. Must not import ``router``.

Shapes (vLLM 0.32's OpenAI server):
- ``n``: n engine requests with the same prompt (vLLM's parallel sampling); choices indexed 0..n-1;
  streaming interleaves the choices' chunks as their tokens come, and a chat stream opens each
  choice with its own ``delta: {"role": "assistant", "content": ""}``; usage counts the prompt
  once and every choice's completion tokens.
- completions ``logprobs: k`` -> ``choice.logprobs = {"text_offset", "token_logprobs", "tokens",
  "top_logprobs": [{token: logprob} * (k or 1)]}``; chat ``logprobs: true`` (``top_logprobs: k``)
  -> ``choice.logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"} * k]}]}``; in a stream each chunk carries its tokens' entries. The
  values are deterministic made-up log-probabilities (<= 0, the sampled token most likely).
- forced named ``tool_choice``: the (guided) output is the arguments JSON of a call to that
  function: ``message: {"role": "assistant", "content": "", "tool_calls": [{"id":
  "chatcmpl-tool-...", "type": "function", "function": {"name", "arguments"}}]}``,
  ``finish_reason: "stop"``; streamed as ``delta.tool_calls`` with the id, type and name in the
  first delta and arguments pieces after.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from simulator.emulator.pod import EmulatedPod, TokenStream

__all__ = ["ChoiceShape", "ShapeError", "collect_choices", "parse_shape", "stream_choices", "usage"]

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class ShapeError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ChoiceShape:
    chat: bool
    n: int = 1
    logprobs: int | None = None  # top-k alternatives per token; None: no logprobs
    tool_name: str | None = None
    tool_argument: str = "arguments"  # the JSON property the filler output fills

    @property
    def simple(self) -> bool:
        return self.n == 1 and self.logprobs is None and self.tool_name is None


def _int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{key} must be an integer", key)
    return value


def parse_shape(body: Mapping[str, Any], chat: bool, tool_name: str | None) -> ChoiceShape:
    n = _int(body, "n")
    if n is not None and n < 1:
        raise ShapeError(f"n must be at least 1, got {n}.", "n")
    top: int | None
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise ShapeError("logprobs must be a boolean", "logprobs")
        top = _int(body, "top_logprobs")
        if top is not None and not wanted:
            raise ShapeError("when using `top_logprobs`, `logprobs` must be set to true.",
                             "top_logprobs")
        top = (top or 0) if wanted else None
    else:
        top = _int(body, "logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ShapeError(f"Requested logprobs of {top}, which is greater than max allowed: "
                         f"{MAX_LOGPROBS}", "logprobs")
    return ChoiceShape(chat=chat, n=n or 1, logprobs=top, tool_name=tool_name,
                       tool_argument=_first_required(body, tool_name))


def _first_required(body: Mapping[str, Any], tool_name: str | None) -> str:
    """The property the made-up arguments fill: the tool's first required one if any."""
    for tool in body.get("tools") or []:
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(fn, Mapping) and fn.get("name") == tool_name:
            params = fn.get("parameters")
            required = params.get("required") if isinstance(params, Mapping) else None
            if isinstance(required, list) and required and isinstance(required[0], str):
                return required[0]
    return "arguments"


# -- logprobs ----------------------------------------------------------------------------------

def _logprob(position: int, rank: int) -> float:
    return round(-0.05 - 0.01 * (position % 7) - 1.5 * rank, 4)


def _alternatives(pod: EmulatedPod, token: str, k: int) -> list[str]:
    out = [token]
    for alt in pod.filler_tokens:
        if len(out) > k:
            break
        if alt not in out:
            out.append(alt)
    return out


def _chat_entry(pod: EmulatedPod, token: str, position: int, k: int) -> dict[str, Any]:
    alts = _alternatives(pod, token, k)
    return {
        "token": token,
        "logprob": _logprob(position, 0),
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": _logprob(position, r), "bytes": list(t.encode())}
            for r, t in enumerate(alts[:k])
        ],
    }


def _completion_logprobs(pod: EmulatedPod, tokens: list[str], first: int, offset: int,
                         k: int) -> dict[str, Any]:
    offsets, tops = [], []
    for i, token in enumerate(tokens):
        offsets.append(offset)
        offset += len(token)
        alts = _alternatives(pod, token, max(k, 1))
        tops.append({t: _logprob(first + i, r) for r, t in enumerate(alts[: max(k, 1)])})
    return {
        "text_offset": offsets,
        "token_logprobs": [_logprob(first + i, 0) for i in range(len(tokens))],
        "tokens": list(tokens),
        "top_logprobs": tops,
    }


def _logprobs(pod: EmulatedPod, shape: ChoiceShape, tokens: list[str], first: int,
              offset: int) -> dict[str, Any] | None:
    if shape.logprobs is None:
        return None
    if shape.chat:
        return {"content": [_chat_entry(pod, t, first + i, shape.logprobs)
                            for i, t in enumerate(tokens)]}
    return _completion_logprobs(pod, tokens, first, offset, shape.logprobs)


# -- whole answers -----------------------------------------------------------------------------

def _tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _arguments(shape: ChoiceShape, text: str) -> str:
    return json.dumps({shape.tool_argument: text})


def usage(streams: list[TokenStream]) -> dict[str, Any]:
    prompt = streams[0].prompt_tokens
    completion = sum(s.produced for s in streams)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": streams[0].cached_tokens},
    }


async def collect_choices(pod: EmulatedPod, streams: list[TokenStream], shape: ChoiceShape,
                          request_id: str) -> dict[str, Any]:
    await asyncio.gather(*(s.done() for s in streams))
    choices = []
    for index, stream in enumerate(streams):
        tokens = stream.tokens()
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": index}
        if shape.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": []}
            if shape.tool_name is not None:
                message["content"] = ""
                message["tool_calls"] = [{
                    "id": _tool_call_id(), "type": "function",
                    "function": {"name": shape.tool_name, "arguments": _arguments(shape, text)},
                }]
            choice["message"] = message
        else:
            choice["text"] = text
        choice["logprobs"] = _logprobs(pod, shape, tokens, 0, 0)
        choice["finish_reason"] = "stop" if shape.tool_name is not None else "length"
        choice["stop_reason"] = None
        choices.append(choice)
    return {
        "id": request_id,
        "object": "chat.completion" if shape.chat else "text_completion",
        "created": int(time.time()),
        "model": pod.config.model,
        "choices": choices,
        "usage": usage(streams),
    }


# -- streams -----------------------------------------------------------------------------------

def _delta(shape: ChoiceShape, token: str, position: int, last: bool,
           call_id: str) -> dict[str, Any]:
    if shape.tool_name is None:
        return {"content": token}
    piece = token
    if position == 0:
        piece = json.dumps({shape.tool_argument: ""})[:-2] + piece  # '{"query": "' + token
    if last:
        piece += '"}'
    call: dict[str, Any] = {"index": 0}
    if position == 0:
        call.update(id=call_id, type="function",
                    function={"name": shape.tool_name, "arguments": piece})
    else:
        call["function"] = {"arguments": piece}
    return {"tool_calls": [call]}


async def stream_choices(request: web.Request, pod: EmulatedPod, streams: list[TokenStream],
                         shape: ChoiceShape, request_id: str,
                         include_usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    head = {
        "id": request_id,
        "object": "chat.completion.chunk" if shape.chat else "text_completion",
        "created": int(time.time()),
        "model": pod.config.model,
    }

    async def send(choice: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        body = {**head, "choices": [choice] if choice else [], **(extra or {})}
        await response.write(f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode())

    # vLLM sends chat's role chunks on its first engine output, i.e. with the first token, not
    # at once: a router that reads the first body chunk as the first token (kv_aware's
    # on_first_token) must see the same timing here.
    roles_sent = not shape.chat

    async def send_roles() -> None:
        nonlocal roles_sent
        roles_sent = True
        for index in range(len(streams)):
            await send({"index": index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None})

    merged: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def pump(index: int, stream: TokenStream) -> None:
        while (token := await stream.next_token()) is not None:
            merged.put_nowait((index, token))
        merged.put_nowait((index, None))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    sent = [0] * len(streams)
    offsets = [0] * len(streams)
    call_ids = [_tool_call_id() for _ in streams]
    open_streams = len(streams)
    try:
        while open_streams:
            index, token = await merged.get()
            if token is None:
                open_streams -= 1
                continue
            if not roles_sent:
                await send_roles()
            position = sent[index]
            sent[index] += 1
            last = sent[index] >= streams[index].max_tokens
            choice: dict[str, Any] = {"index": index}
            if shape.chat:
                choice["delta"] = _delta(shape, token, position, last, call_ids[index])
            else:
                choice["text"] = token
            choice["logprobs"] = _logprobs(pod, shape, [token], position, offsets[index])
            offsets[index] += len(token)
            finish = "stop" if shape.tool_name is not None else "length"
            choice["finish_reason"] = finish if last else None
            choice["stop_reason"] = None
            await send(choice)
        if not roles_sent:
            await send_roles()
        if include_usage:
            await send({}, {"usage": usage(streams)})
        await response.write_eof(b"data: [DONE]\n\n")
    finally:
        for task in pumps:
            task.cancel()
    return response
