"""The emulator's KV-event publisher: vLLM's ZMQ wire format, its bind-or-connect rule and its
replay socket; plus vLLM-like engine block hashes.

Async (zmq.asyncio); used only by ``simulator.emulator.fleet``. Must not import ``router`` or aiohttp.

Wire format (as vLLM's ``ZmqEventPublisher``):
- PUB socket, one message per scheduler step that produced events: three frames
  ``[topic (utf-8), seq (8 bytes big-endian, from 0), msgpack([ts, [event, ...], dp_rank])]``;
  each event a msgpack map with a ``type`` key (``BlockStored``, ``BlockRemoved``,
  ``AllBlocksCleared``).
- The PUB socket BINDS only when the endpoint contains ``*`` or ``::`` or starts with
  ``ipc://`` / ``inproc://``; otherwise it CONNECTS (the subscriber binds; many engines can fan
  in to one SUB socket, told apart by topic). A port of 0 with ``*`` binds an ephemeral port.
- Replay: a ROUTER socket, always bound. A DEALER sends ``[b"", start_seq (8 bytes)]`` and gets
  ``[b"", topic, seq, payload]`` per buffered batch with ``seq >= start_seq``, then the end
  marker ``[b"", b"", (-1).to_bytes(8, "big", signed=True), b""]``. A malformed request is
  counted in ``replay_errors`` and ignored; the publisher keeps going.

Engine hashes deliberately differ from the router's (as real vLLM's do): the low 64 bits of a
SHA-256 over the parent hash and the block's tokens, rooted at a per-engine seed, so a router
must translate engine hashes through the events' ``token_ids``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from array import array
from collections import deque
from collections.abc import Sequence

import msgpack
import zmq
import zmq.asyncio

from policies.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

__all__ = [
    "END_MARKER_SEQ",
    "KvEventPublisher",
    "encode_event",
    "engine_binds",
    "vllm_block_hashes",
]

log = logging.getLogger(__name__)

END_MARKER_SEQ = (-1).to_bytes(8, "big", signed=True)


def vllm_block_hashes(token_ids: Sequence[int], block_size: int, seed: bytes) -> tuple[int, ...]:
    """Chained hashes of the full blocks of ``token_ids`` (vLLM-like, not the router's)."""
    out: list[int] = []
    parent = hashlib.sha256(seed).digest()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = array("q", token_ids[start : start + block_size]).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        out.append(int.from_bytes(parent[-8:], "big"))
    return tuple(out)


def engine_binds(endpoint: str) -> bool:
    """vLLM's rule: bind for wildcard or local-transport endpoints, connect otherwise."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


def encode_event(event: KvEvent) -> dict[str, object]:
    if isinstance(event, BlockStored):
        return {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
            **({"locality": event.locality} if event.locality is not None else {}),
        }
    if isinstance(event, BlockRemoved):
        return {
            "type": "BlockRemoved",
            "block_hashes": list(event.block_hashes),
            "medium": event.medium,
            **({"locality": event.locality} if event.locality is not None else {}),
        }
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {event!r}")


def _bind(sock: zmq.asyncio.Socket, endpoint: str) -> str:
    """Bind, turning ``tcp://*:0`` into an ephemeral port; return the endpoint as configured
    (with the real port), which is what ``/kv_event_sources`` reports."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        host = endpoint[len("tcp://") : -len(":0")]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(endpoint)
    return endpoint


class KvEventPublisher:
    """One engine's publisher. ``await start()``, ``publish(events)``, ``await close()``."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str,
        buffer_steps: int = 10_000,
        data_parallel_rank: int = 0,
    ) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self._topic_bytes = topic.encode()
        self._rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self.replay_errors = 0
        self.published_batches = 0

    async def start(self) -> None:
        # Each socket is kept before it binds, so that close() also closes one whose bind
        # failed (a port still held by a previous publisher) instead of leaking it.
        pub = self._pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        if engine_binds(self.endpoint):
            self.endpoint = _bind(pub, self.endpoint)
        else:
            pub.connect(self.endpoint)
        if self.replay_endpoint:
            replay = self._replay = self._ctx.socket(zmq.ROUTER)
            replay.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = _bind(replay, self.replay_endpoint)
            self._replay_task = asyncio.create_task(self._serve_replay())

    def source_info(self) -> dict[str, object]:
        """This rank's entry in ``GET /kv_event_sources`` (vLLM's KV-events config)."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "topic": self.topic,
            "buffer_steps": self._buffer.maxlen,
            "data_parallel_rank": self._rank,
        }

    def publish(self, events: Sequence[KvEvent]) -> None:
        """Send one step's events as one message (nothing is sent for an empty step)."""
        if not events or self._pub is None:
            return
        payload = msgpack.packb(
            [time.time(), [encode_event(e) for e in events], self._rank], use_bin_type=True
        )
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            # PUB never blocks: with no subscriber or a full queue, ZMQ drops (as vLLM loses
            # events sent while nobody listens; replay recovers them).
            self._pub.send_multipart(
                [self._topic_bytes, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK
            )
        except zmq.Again:
            pass
        self.published_batches += 1

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        sock = self._replay
        while True:
            frames = await sock.recv_multipart()
            try:
                if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                    raise ValueError(f"malformed replay request ({len(frames)} frames)")
                identity = frames[0]
                start = int.from_bytes(frames[2], "big")
                for seq, payload in list(self._buffer):
                    if seq >= start:
                        await sock.send_multipart(
                            [identity, b"", self._topic_bytes, seq.to_bytes(8, "big"), payload]
                        )
                await sock.send_multipart([identity, b"", b"", END_MARKER_SEQ, b""])
            except (ValueError, zmq.ZMQError) as exc:
                self.replay_errors += 1
                log.warning("kv events replay: %s; ignored", exc)

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            # wait() collects the cancelled task without raising, so a cancellation of
            # close() itself still propagates.
            await asyncio.wait([self._replay_task])
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
