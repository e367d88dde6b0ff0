"""Real vLLM engines vs the router's own pieces, without a router process in between.

Proves, against vLLM 0.32 (CPU) serving the tiny model: the router's tokenizer gives exactly
the engine's prompt tokens (completions and chat through the chat template); the engine's
KV events decode with ``router.kv.wire`` and carry, block by block, the tokens the router
computes; a cache hit shows in ``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from vllm_client import MODEL, chat_body, completion_body, post, text

from policies.kv.events import BlockStored
from router.kv.wire import decode_live
from router.prompt.tokenize import ModelTokenizer, load_tokenizer

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = "simulator/data/tiny-tokenizer"
CHATS: list[tuple[str, list[dict[str, Any]]]] = [
    ("one-user-turn", [{"role": "user", "content": text(1, 150)}]),
    ("system-and-turns", [
        {"role": "system", "content": text(2, 80)},
        {"role": "user", "content": text(3, 60)},
        {"role": "assistant", "content": text(4, 40)},
        {"role": "user", "content": text(5, 30)},
    ]),
    ("content-parts", [{"role": "user", "content": [
        {"type": "text", "text": text(6, 70)}, {"type": "text", "text": text(7, 50)}]}]),
]
COMPLETIONS = [
    ("words", text(10, 200)),
    ("punctuation-and-digits", "Q: " + text(11, 60) + "? 12345, 678.\nA: " + text(12, 60)),
    ("unicode", "café naïve — " + text(13, 90) + " 東京 ✓"),
]


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer(load_tokenizer(ROOT / TOKENIZER_DIR))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        yield s


@pytest.mark.parametrize(("name", "prompt"), COMPLETIONS, ids=[c[0] for c in COMPLETIONS])
async def test_completion_tokens_equal_engine(
    cluster: Any, session: aiohttp.ClientSession, tokenizer: ModelTokenizer, name: str,
    prompt: str,
) -> None:
    async with session.post(f"{cluster.a.url}/tokenize",
                            json={"model": MODEL, "prompt": prompt}) as resp:
        assert resp.status == 200, await resp.text()
        engine = (await resp.json())["tokens"]
    ours = list(tokenizer.tokenize_body({"model": MODEL, "prompt": prompt}, chat=False).token_ids)
    assert len(engine) > 32
    assert ours == engine


@pytest.mark.parametrize(("name", "messages"), CHATS, ids=[c[0] for c in CHATS])
async def test_chat_tokens_equal_engine(
    cluster: Any, session: aiohttp.ClientSession, tokenizer: ModelTokenizer, name: str,
    messages: list[dict[str, Any]],
) -> None:
    async with session.post(f"{cluster.a.url}/tokenize", json={
            "model": MODEL, "messages": messages, "add_generation_prompt": True}) as resp:
        assert resp.status == 200, await resp.text()
        engine = (await resp.json())["tokens"]
    ours = list(tokenizer.tokenize_body({"model": MODEL, "messages": messages}, chat=True).token_ids)
    assert len(engine) > 32
    assert ours == engine


async def _stored_events(sub: zmq.asyncio.Socket, topic: str, timeout_s: float
                         ) -> list[BlockStored]:
    """Every BlockStored of ``topic`` until the stream is quiet for a moment."""
    stored: list[BlockStored] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not await sub.poll(1000 if stored else 200):
            if stored:
                return stored
            continue
        decoded = decode_live(await sub.recv_multipart())
        if decoded.topic == topic:
            stored += [e for e in decoded.batch.events if isinstance(e, BlockStored)]
    return stored


@pytest.fixture
async def events(cluster: Any) -> AsyncIterator[zmq.asyncio.Socket]:
    """A SUB bound where the engines publish (as the router binds it); closed after the test."""
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.bind(cluster.events_endpoint)
    try:
        yield sub
    finally:
        sub.close()
        ctx.term()


async def _attach(session: aiohttp.ClientSession, engine: Any, sub: zmq.asyncio.Socket) -> None:
    """Wait until the engine's PUB has reconnected to our SUB: messages sent before are lost."""
    deadline = time.monotonic() + 60
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        # A fresh two-block prompt stores new blocks, so it always produces an event.
        result = await post(session, f"{engine.url}/v1/completions",
                            completion_body(f"attach {attempt} {time.time()} " + text(attempt, 60),
                                            max_tokens=1))
        assert result.status == 200, result.body
        if await _stored_events(sub, engine.spec.event_topic, 3.0):
            return
    raise AssertionError(f"no KV events from {engine.url} on {engine.spec.event_topic}")


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_engine_blocks_equal_router_blocks(
    cluster: Any, session: aiohttp.ClientSession, tokenizer: ModelTokenizer,
    events: zmq.asyncio.Socket, kind: str,
) -> None:
    engine = cluster.b
    await _attach(session, engine, events)
    if kind == "chat":
        messages = [{"role": "system", "content": text(20, 50)},
                    {"role": "user", "content": text(21, 120)}]
        body = chat_body(messages, max_tokens=1)
        url = f"{engine.url}/v1/chat/completions"
        ours = list(tokenizer.tokenize_body(body, chat=True).token_ids)
    else:
        body = completion_body(text(22, 170), max_tokens=1)
        url = f"{engine.url}/v1/completions"
        ours = list(tokenizer.tokenize_body(body, chat=False).token_ids)
    result = await post(session, url, body)
    assert result.status == 200, result.body
    assert result.usage()["prompt_tokens"] == len(ours)
    stored = await _stored_events(events, engine.spec.event_topic, 30.0)
    full_blocks = len(ours) // 32
    assert full_blocks >= 3
    # Only full blocks are stored; the partial tail block never is.
    engine_tokens = [t for event in stored for t in event.token_ids]
    assert all(event.block_size == 32 for event in stored)
    assert len(engine_tokens) == full_blocks * 32
    assert engine_tokens == ours[: full_blocks * 32]
    # The chain starts at the root: the first stored block has no parent.
    assert stored[0].parent_block_hash is None


async def test_cached_tokens_reported_on_a_hit(
    cluster: Any, session: aiohttp.ClientSession, tokenizer: ModelTokenizer
) -> None:
    prompt = text(30, 300)
    first = await post(session, f"{cluster.a.url}/v1/completions", completion_body(prompt))
    second = await post(session, f"{cluster.a.url}/v1/completions", completion_body(prompt))
    n = len(tokenizer.tokenize_body({"prompt": prompt}, chat=False).token_ids)
    assert first.status == second.status == 200
    assert first.cached_tokens() == 0
    # A whole number of blocks, at most prompt_len - 1 rounded down to a block.
    assert second.cached_tokens() == (n - 1) // 32 * 32
