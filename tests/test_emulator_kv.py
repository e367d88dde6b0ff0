"""The emulator's KV-event stream decoded by an independent decoder written to vLLM's wire
format (raw pyzmq + msgpack, nothing from the emulator): framing, event maps, the bind/connect
rule with fan-in, the replay socket after a gap, and malformed replay requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from simulator.emulator.fleet import EmulatedCluster

MODEL = "tiny-llama"
BS = 16
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def decode(frames: list[bytes]) -> tuple[str, int, list[dict[str, Any]]]:
    """vLLM's three frames: topic, 8-byte big-endian seq, msgpack [ts, events, dp_rank]."""
    assert len(frames) == 3
    topic, seq, payload = frames
    assert len(seq) == 8
    batch = msgpack.unpackb(payload, raw=False)
    assert isinstance(batch, list) and len(batch) == 3
    ts, events, rank = batch
    assert isinstance(ts, float) and ts > 1.6e9 and rank == 0
    for event in events:
        assert isinstance(event, dict) and event["type"] in (
            "BlockStored",
            "BlockRemoved",
            "AllBlocksCleared",
        )
    return topic.decode(), int.from_bytes(seq, "big"), events


def apply(events: list[dict[str, Any]], blocks: set[int]) -> None:
    for event in events:
        if event["type"] == "BlockStored":
            assert len(event["token_ids"]) == len(event["block_hashes"]) * event["block_size"]
            assert event["medium"] == "GPU"
            blocks.update(event["block_hashes"])
        elif event["type"] == "BlockRemoved":
            blocks.difference_update(event["block_hashes"])
        else:
            blocks.clear()


async def recv(sock: zmq.asyncio.Socket, timeout_s: float = 20.0) -> list[bytes]:
    return await asyncio.wait_for(sock.recv_multipart(), timeout_s)


async def replay(
    ctx: zmq.asyncio.Context, endpoint: str, start: int
) -> list[tuple[str, int, bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        while True:
            frames = await recv(dealer)
            assert len(frames) == 4 and frames[0] == b""
            if frames[2] == END_SEQ:
                assert frames[1] == b"" and frames[3] == b""
                return out
            out.append((frames[1].decode(), int.from_bytes(frames[2], "big"), frames[3]))
    finally:
        dealer.close()


async def complete(s: aiohttp.ClientSession, url: str, prompt: str) -> dict[str, Any]:
    async with s.post(
        url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}
    ) as r:
        assert r.status == 200
        answer: dict[str, Any] = await r.json()
        return answer


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.term()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def subscribe_until_flowing(
    ctx: zmq.asyncio.Context, endpoint: str, s: aiohttp.ClientSession, url: str
) -> tuple[zmq.asyncio.Socket, tuple[str, int, list[dict[str, Any]]]]:
    """Connect a SUB and send fresh prompts until a message arrives (ZMQ's slow joiner)."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    for i in range(200):
        await complete(s, url, f"warm-up prompt number {i} " * 4)
        if await sub.poll(100):
            return sub, decode(await recv(sub))
    raise AssertionError("no KV event arrived")


async def test_stream_decodes_and_replay_closes_a_gap(
    ctx: zmq.asyncio.Context, session: aiohttp.ClientSession
) -> None:
    async with EmulatedCluster(count=1, time_scale=100.0, block_size=BS) as cluster:
        url = cluster.urls[0]
        sub, (topic, last_seq, _) = await subscribe_until_flowing(
            ctx, cluster.kv_endpoints[0], session, url
        )
        assert topic == "kv@pod-0"
        prompt = "a shared system prompt for the replay test. " * 8
        await complete(session, url, prompt)
        topic, seq, events = decode(await recv(sub))
        assert seq > last_seq
        (stored,) = events
        assert stored["type"] == "BlockStored" and stored["block_size"] == BS
        assert stored["parent_block_hash"] is None  # a new chain, from its first block
        async with session.post(url + "/tokenize", json={"model": MODEL, "prompt": prompt}) as r:
            tokens = (await r.json())["tokens"]
        n = len(tokens) // BS
        assert stored["token_ids"] == tokens[: n * BS] and len(stored["block_hashes"]) == n
        # A hit emits nothing; a longer prompt stores only its new blocks, parented on the old.
        await complete(session, url, prompt + "and then a follow-up question " * 3)
        _, seq2, (more,) = decode(await recv(sub))
        assert seq2 == seq + 1
        assert more["parent_block_hash"] == stored["block_hashes"][-1]
        last_seq = seq2

        # A gap: the subscriber goes away while the engine keeps storing blocks.
        sub.close()
        for i in range(5):
            await complete(session, url, f"missed while away {i} " * 6)
        sub, (_, seq_after, _) = await subscribe_until_flowing(
            ctx, cluster.kv_endpoints[0], session, url
        )
        assert seq_after > last_seq + 1
        missed = await replay(ctx, cluster.kv_replay_endpoints[0], last_seq + 1)
        seqs = [s for _, s, _ in missed]
        assert seqs == list(range(last_seq + 1, seqs[-1] + 1)) and seqs[-1] >= seq_after
        assert {t for t, _, _ in missed} == {"kv@pod-0"}

        # Replaying everything from 0 reproduces exactly the engine's cached block set.
        blocks: set[int] = set()
        for t, s, payload in await replay(ctx, cluster.kv_replay_endpoints[0], 0):
            apply(decode([t.encode(), s.to_bytes(8, "big"), payload])[2], blocks)
        assert blocks == cluster.pods[0].engine.cached_keys()
        sub.close()


async def test_full_report_mode_reannounces_hits(
    ctx: zmq.asyncio.Context, session: aiohttp.ClientSession
) -> None:
    async with EmulatedCluster(count=1, time_scale=100.0, block_size=BS) as cluster:
        url = cluster.urls[0]
        prompt = "a prompt that will be hit and then reported in full. " * 4
        await complete(session, url, prompt)
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 1,
            "vllm_xargs": {"kv_cache_report_mode": "full"},
        }
        async with session.post(url + "/v1/completions", json=body) as r:
            cached = (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"]
        batches = await replay(ctx, cluster.kv_replay_endpoints[0], 0)
        events = [decode([t.encode(), s.to_bytes(8, "big"), p])[2] for t, s, p in batches]
        first, report = events[0][0], events[-1][0]
        assert report["type"] == "BlockStored" and report["parent_block_hash"] is None
        assert report["block_hashes"] == first["block_hashes"][: cached // BS]
        assert report["token_ids"] == first["token_ids"][:cached]


async def test_malformed_replay_requests_do_not_kill_the_publisher(
    ctx: zmq.asyncio.Context, session: aiohttp.ClientSession
) -> None:
    async with EmulatedCluster(count=1, time_scale=100.0) as cluster:
        await complete(session, cluster.urls[0], "something to buffer " * 5)
        bad = ctx.socket(zmq.DEALER)
        bad.setsockopt(zmq.LINGER, 0)
        bad.connect(cluster.kv_replay_endpoints[0])
        await bad.send_multipart([b"garbage"])
        await bad.send_multipart([b"", b"short"])
        await bad.send_multipart([b"", (0).to_bytes(8, "big"), b"extra"])
        publisher = cluster.pods[0].publisher
        assert publisher is not None
        for _ in range(200):
            if publisher.replay_errors == 3:
                break
            await asyncio.sleep(0.02)
        assert publisher.replay_errors == 3
        bad.close()
        good = await replay(ctx, cluster.kv_replay_endpoints[0], 0)
        assert [s for _, s, _ in good] == list(range(len(good))) and good


def shared(seen: dict[str, list[dict[str, Any]]]) -> list[tuple[list[int], list[int]]]:
    """(pod-0 hashes, pod-1 hashes) of BlockStored events carrying the same tokens."""
    by_tokens = [
        {
            tuple(e["token_ids"]): e["block_hashes"]
            for e in seen.get(t, [])
            if e["type"] == "BlockStored"
        }
        for t in ("kv@pod-0", "kv@pod-1")
    ]
    return [(h, by_tokens[1][k]) for k, h in by_tokens[0].items() if k in by_tokens[1]]


async def test_connect_endpoint_fans_in_to_a_bound_subscriber(
    ctx: zmq.asyncio.Context, session: aiohttp.ClientSession
) -> None:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    async with EmulatedCluster(count=2, time_scale=100.0, kv_events_endpoint=endpoint) as cluster:
        # The pods connected (no wildcard): they report the endpoint as configured.
        async with session.get(cluster.urls[1] + "/kv_event_sources") as r:
            (source,) = await r.json()
        assert source["endpoint"] == endpoint and source["topic"] == "kv@pod-1"
        seen: dict[str, list[dict[str, Any]]] = {}
        prompt = "the same prompt on both pods, hashed differently by each. " * 3
        for i in range(200):
            # Until both subscriptions are live, earlier messages may be lost: each round
            # uses a new prompt so every round stores fresh blocks on both pods.
            for url in cluster.urls:
                await complete(session, url, f"{i} " + prompt)
            while await sub.poll(50):
                topic, _, events = decode(await recv(sub))
                seen.setdefault(topic, []).extend(events)
            if len(seen) == 2 and shared(seen):
                break
        assert set(seen) == {"kv@pod-0", "kv@pod-1"}
        pairs = shared(seen)
        assert pairs
        # Engine hashes are per-engine (seeded), so equal tokens give different hashes: the
        # router must translate through token_ids.
        for hashes_a, hashes_b in pairs:
            assert hashes_a != hashes_b
    sub.close()


async def test_ipc_endpoints_are_bound_per_pod(
    ctx: zmq.asyncio.Context, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    base = f"ipc://{tmp_path}/kv"
    async with EmulatedCluster(count=2, time_scale=100.0, kv_events_endpoint=base) as cluster:
        # ipc:// binds (vLLM's rule), one path per pod like its data-parallel ranks.
        assert cluster.kv_endpoints == [base, f"{base}-1"]
        for endpoint, url in zip(cluster.kv_endpoints, cluster.urls, strict=True):
            sub, (topic, _, events) = await subscribe_until_flowing(ctx, endpoint, session, url)
            assert topic == f"kv@pod-{cluster.urls.index(url)}"
            assert events and events[0]["type"] == "BlockStored"
            sub.close()


@pytest.mark.parametrize("which", ["pub", "replay"])
async def test_a_publisher_whose_bind_fails_closes_its_sockets(which: str) -> None:
    """A restarted engine's publisher may find its port still held; close() then releases the
    socket that failed to bind too (it leaked before: a ResourceWarning at collection)."""
    import gc
    import warnings

    from simulator.emulator.kv import KvEventPublisher

    ctx = zmq.asyncio.Context()
    holder = ctx.socket(zmq.PUB)
    holder.setsockopt(zmq.LINGER, 0)
    port = holder.bind_to_random_port("tcp://*")
    taken, free = f"tcp://*:{port}", "tcp://*:0"  # `*`: the engine binds (vLLM's rule)
    endpoints = (taken, free) if which == "pub" else (free, taken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            publisher = KvEventPublisher(ctx, *endpoints, topic="kv")
            with pytest.raises(zmq.ZMQError):
                await publisher.start()
            await publisher.close()
            del publisher
            gc.collect()
        leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaks, [str(w.message) for w in leaks]
    finally:
        holder.close(linger=0)
        ctx.destroy(linger=0)
