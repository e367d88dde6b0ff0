"""Deterministic prompts and small HTTP/SSE readers for the real-vLLM suite.

Prompt text comes from a seeded generator over a fixed word list, so runs are repeatable and
two seeds share no long prefix. Must not import ``router`` or ``simulator``.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

MODEL = "tiny-llama"
_WORDS = (
    "the of and to in is you that it was for on are as with they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which do how "
    "their if will up other about out many then them these so some would make like into time "
    "has look two more write go see number no way could people than first water been call who "
    "now find long down day did get come made may part system prompt user assistant model "
    "token cache block router request backend engine prefix decode prefill query answer "
    "document question tenant session agent tool context memory latency throughput"
).split()


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def completion_body(prompt: str, *, max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def chat_body(messages: list[dict[str, Any]], *, max_tokens: int = 4,
              stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass(frozen=True, slots=True)
class Result:
    status: int
    body: bytes
    headers: dict[str, str]
    ttft_s: float | None
    """Seconds from sending to the first SSE event carrying generated text (streams only)."""

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def backend(self) -> str | None:
        return self.headers.get("x-kvrouter-backend")

    def usage(self) -> dict[str, Any]:
        """The usage object (for streams: from the final usage chunk)."""
        if self.headers.get("content-type", "").startswith("text/event-stream"):
            for event in sse_events(self.body):
                if event != "[DONE]" and json.loads(event).get("usage"):
                    return dict(json.loads(event)["usage"])
            raise AssertionError(f"no usage chunk in stream: {self.body[-300:]!r}")
        return dict(self.json()["usage"])

    def cached_tokens(self) -> int:
        details = self.usage().get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Result:
    """POST a JSON body; read the whole answer, noting when the first token event arrived."""
    started = time.monotonic()
    ttft_s: float | None = None
    async with session.post(url, json=body) as resp:
        chunks = []
        async for chunk in resp.content.iter_any():
            if ttft_s is None and body.get("stream") and _has_token(b"".join(chunks) + chunk):
                ttft_s = time.monotonic() - started
            chunks.append(chunk)
        return Result(resp.status, b"".join(chunks), {k.lower(): v for k, v in resp.headers.items()},
                      ttft_s)


def _has_token(data: bytes) -> bool:
    for event in sse_events(data):
        if event == "[DONE]":
            continue
        try:
            choices = json.loads(event).get("choices") or []
        except ValueError:
            continue  # an event cut in the middle: wait for the rest
        for choice in choices:
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                return True
    return False


def sse_events(data: bytes) -> list[str]:
    return [line[len(b"data: "):].decode() for line in data.split(b"\n")
            if line.startswith(b"data: ")]


# vLLM stamps every response with a fresh id and a creation time; nothing else differs between
# two identical requests at temperature 0.
_ID = re.compile(rb'"id":"(?:cmpl|chatcmpl)-[0-9a-zA-Z-]+"')
_CREATED = re.compile(rb'"created":\d+')


def normalised(body: bytes) -> bytes:
    return _CREATED.sub(b'"created":0', _ID.sub(b'"id":"ID"', body))
