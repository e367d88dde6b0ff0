"""KV-event ingestion: engines' ZMQ streams -> ``PrefixIndex.apply``, with gaps closed by replay.

Sockets. vLLM's publisher BINDS when its endpoint contains ``*`` or ``::`` or is ``ipc://`` /
``inproc://``, and CONNECTS otherwise. So for each source the router CONNECTS a SUB socket to
binding engines (``*`` replaced by the backend's host) and BINDS one for connecting engines;
sources naming the same bind address share one socket (fan-in) and are told apart by topic.

Streams. Each (socket, topic, data-parallel rank) is one stream with an expected sequence
number; batches are applied strictly in order:

- seq == expected: apply;
- seq > expected (gap, e.g. the PUB dropped messages): ask the engine's REPLAY socket (DEALER,
  ``[b"", start_seq]``) for everything from ``expected``, hold live messages meanwhile, apply
  the answer, then the held messages not already covered;
- seq < expected on the live socket: the engine restarted (sequences restart at 0): clear the
  backend in the index (``AllBlocksCleared``), then continue from this message (replaying from 0
  when it is not 0);
- start-up (the router joining late) asks every source's replay socket for everything from 0, so
  blocks cached before the router started are known;
- a connection that (re)opens after start-up (a socket monitor sees it) replays its sources from
  0 again: batches already applied are recognised by their engine timestamps and skipped, and a
  batch below our sequence that we never saw means the engine restarted even when the first
  batches of its new life were lost (its sequence may then look continuous).

A replay answer that starts after the asked sequence means the engine's buffer moved on: the
gap cannot be filled, so the backend is cleared (missing entries cost hits; stale ones would
send requests to caches that no longer hold them). Warm start is the exception: streams
restored from a sibling's snapshot (``restore_positions``, before their sources are added)
replay from the snapshot's position instead of 0, and when the buffer no longer reaches it the
snapshot's blocks are kept (counted, logged): they hold every prefix older than the buffer,
which clearing would throw away, and the engine's later events correct them. A replay that ends
(or times out) still short of a held message is retried after ``replay_backoff_s``, doubling,
at most ``max_gap_replays`` times; then the stream is resynchronised (counted): the backend is
cleared and the held message starts the sequence anew, as after a restart. (A message far
ahead, e.g. seq 10^12, would otherwise ask for a replay after every replay, for ever.) A source
without a replay endpoint accepts gaps and counts them. Live messages are read by a plain
socket's descriptor reader (``loop.add_reader``), at most 64 frames per loop turn and the rest
on the next: a ``zmq.asyncio`` receive costs a future and several callbacks per frame, which
in a streamed cell was most of what the events cost the router (bench/README.md, "KV events
read by the socket's descriptor"). ZeroMQ's descriptor is edge-triggered, so a drain reads
until ``EVENTS`` says nothing is left, and every socket is drained once a second too, in case
an edge is missed. Malformed messages are counted and
skipped; nothing a source sends can stop the loop. Lag (engine ``ts`` to applied, wall clock)
is a histogram of live batches only; replayed batches, old by nature, are counted apart.

Must not import aiohttp or ``simulator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import zmq
import zmq.asyncio

from policies.kv.events import AllBlocksCleared, BlockStored, KvEvent
from policies.types import BackendId, BlockHash
from router.kv.auth import EventSocketGate
from router.kv.metrics import KvMetrics
from router.kv.snapshot import StreamPosition
from router.kv.sources import KvEventSource, subscribe_plan
from router.kv.wire import DecodedBatch, WireError, decode_live, decode_replay, replay_request

__all__ = ["EventSink", "KvEventIngestor", "StoredObserver"]

log = logging.getLogger("kvrouter.kv_events")

_DRAIN_FRAMES = 64  # live frames applied per loop turn; the rest wait for the next turn
# A plain int: ``events & zmq.POLLIN`` goes through Python's ``Flag.__and__`` and builds an
# enum member, 0.57 us against 0.03 us, once per frame read (0.7% of kv_aware's CPU in a
# streamed quality cell).
_POLLIN = int(zmq.POLLIN)
_SAFETY_DRAIN_S = 1.0  # every socket is drained this often too (a missed edge)


class EventSink(Protocol):
    """What ingestion needs from ``policies.kv.index.PrefixIndex``."""

    def apply(self, backend_id: BackendId, event: KvEvent, now_s: float) -> tuple[BlockHash, ...]:
        ...


StoredObserver = Callable[[BackendId, BlockStored, tuple[BlockHash, ...]], None]
"""Called with each applied BlockStored and the router hashes it indexed (token parity)."""


@dataclass(slots=True, eq=False)
class _Stream:
    source: KvEventSource
    rank: int
    next_seq: int | None = None
    last_ts: float = float("-inf")
    replaying: bool = False
    held: list[DecodedBatch] = field(default_factory=list)
    gap_replays: int = 0
    """Replays in a row that ended with the held messages' gap still open."""
    restored: bool = False
    """Positioned from a sibling's snapshot; its first replay has not ended yet."""


class KvEventIngestor:
    """Background KV-event ingestion for a set of sources; ``run()`` is the app's task."""

    def __init__(
        self,
        sink: EventSink,
        sources: list[KvEventSource],
        metrics: KvMetrics,
        *,
        now_s: Callable[[], float] = time.monotonic,
        wall_s: Callable[[], float] = time.time,
        replay_timeout_s: float = 5.0,
        replay_on_start: bool = True,
        max_gap_replays: int = 3,
        replay_backoff_s: float = 0.5,
        on_stored: StoredObserver | None = None,
        on_backend_live: Callable[[BackendId], None] | None = None,
        gate: EventSocketGate | None = None,
    ) -> None:
        self.sink = sink
        self.sources = list(sources)
        self.metrics = metrics
        self._now_s = now_s
        self._wall_s = wall_s
        self.replay_timeout_s = replay_timeout_s
        self.replay_on_start = replay_on_start
        self.max_gap_replays = max_gap_replays
        self.replay_backoff_s = replay_backoff_s
        self.on_stored = on_stored
        self.on_backend_live = on_backend_live
        self.gate = gate
        """Admits only backends' addresses to the sockets the router binds (None: anyone)."""
        self._streams: dict[tuple[BackendId, str, int], _Stream] = {}
        self._groups: dict[tuple[str, bool], list[KvEventSource]] = {}
        # Per live socket: the socket, its descriptor (read by the loop) and its monitor task.
        self._sockets: dict[tuple[str, bool],
                            tuple[zmq.Socket[bytes], int, asyncio.Task[None]]] = {}
        self._replay_tasks: set[asyncio.Task[None]] = set()
        self._ctx: zmq.asyncio.Context | None = None
        self.started = asyncio.Event()
        """Set once ``run`` can take ``add_source`` calls."""
        self.ready = asyncio.Event()
        """Set once every socket is bound/connected and start-up replays have finished."""
        self.applied_batches = 0
        self._restored: dict[tuple[BackendId, str], list[StreamPosition]] = {}

    def restore_positions(self, positions: Sequence[StreamPosition]) -> None:
        """Streams of a restored snapshot: their sources, once added, replay from there."""
        for p in positions:
            self._restored.setdefault((p.backend_id, p.topic), []).append(p)

    def positions(self) -> tuple[StreamPosition, ...]:
        """Where every stream stands: what the index holds is everything below ``next_seq``."""
        return tuple(StreamPosition(b, topic, rank, st.next_seq, st.last_ts)
                     for (b, topic, rank), st in self._streams.items() if st.next_seq is not None)

    def catching_up(self) -> int:
        """Restored streams not replayed yet (their sources not added, or replays running)."""
        return (sum(len(v) for v in self._restored.values())
                + sum(st.restored for st in self._streams.values()))

    async def run(self) -> None:
        """Subscribe to the initial sources, replay them, then ingest until cancelled."""
        self._ctx = zmq.asyncio.Context()
        if self.gate is not None:
            self.gate.start(self._ctx)
        self.started.set()
        try:
            for source in list(self.sources):
                self.sources.remove(source)
                self.add_source(source)
            while self._replay_tasks:
                await asyncio.wait(set(self._replay_tasks))
            self.ready.set()
            while True:
                await asyncio.sleep(_SAFETY_DRAIN_S)
                for key, (sock, _, _) in list(self._sockets.items()):
                    self._read_live(sock, *key)
        finally:
            tasks = list(self._replay_tasks) + [t for _, _, t in self._sockets.values()]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            loop = asyncio.get_running_loop()
            for sock, fd, _ in self._sockets.values():
                loop.remove_reader(fd)
                sock.close(linger=0)
            self._sockets.clear()
            if self.gate is not None:
                self.gate.stop()
            self._ctx.destroy(linger=0)
            self._ctx = None

    def add_source(self, source: KvEventSource) -> None:
        """Subscribe to one more source while running (discovery); replays it from 0.

        Raises ValueError when it would share a bound socket without a distinct topic.
        """
        assert self._ctx is not None, "add_source needs a running ingestor"
        plan = subscribe_plan([*self.sources, source])
        address, bind, _ = next(p for p in plan if source in p[2])
        self.sources.append(source)
        self._groups = {(a, b): g for a, b, g in plan}
        self._update_gate()
        entry = self._sockets.get((address, bind))
        if entry is None:
            # A plain socket on the asyncio context (its ZAP gate), read through its descriptor.
            sock: zmq.Socket[bytes] = zmq.Socket(self._ctx, zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            if bind and self.gate is not None:
                self.gate.protect(sock)
            try:
                sock.bind(address) if bind else sock.connect(address)
            except zmq.ZMQError:
                sock.close(linger=0)
                self.sources.remove(source)
                self._groups = {(a, b): g for a, b, g in subscribe_plan(self.sources)}
                self._update_gate()
                raise
            loop = asyncio.get_running_loop()
            fd = cast(int, sock.get(zmq.FD))
            loop.add_reader(fd, self._read_live, sock, address, bind)
            self._sockets[(address, bind)] = (
                sock, fd, loop.create_task(self._watch(sock, address, bind)))
        restored = self._restored.pop((source.backend_id, source.topic), [])
        for p in restored:
            stream = self._stream(source, p.rank)
            stream.next_seq, stream.last_ts = p.next_seq, p.last_ts
            if self.replay_on_start and source.replay_endpoint is not None:
                stream.restored = True
                self._spawn_replay(stream, p.next_seq)
        if not restored and self.replay_on_start and source.replay_endpoint is not None:
            self._spawn_replay(self._stream(source, 0), 0)

    def remove_backend(self, backend_id: BackendId) -> None:
        """Stop taking events from ``backend_id`` (its sockets close when no source is left)."""
        self.sources = [s for s in self.sources if s.backend_id != backend_id]
        for restored_key in [k for k in self._restored if k[0] == backend_id]:
            del self._restored[restored_key]
        for stream_key in [k for k in self._streams if k[0] == backend_id]:
            del self._streams[stream_key]
        self._groups = {(a, b): g for a, b, g in subscribe_plan(self.sources)}
        self._update_gate()
        for socket_key in [k for k in self._sockets if k not in self._groups]:
            sock, fd, task = self._sockets.pop(socket_key)
            asyncio.get_running_loop().remove_reader(fd)
            task.cancel()
            sock.close(linger=0)

    def _update_gate(self) -> None:
        if self.gate is not None:
            self.gate.set_hosts(s.host for (_, bind), group in self._groups.items() if bind
                                for s in group)

    async def _watch(self, sock: zmq.Socket[bytes], address: str, bind: bool) -> None:
        """Replay a socket's sources from 0 whenever a connection (re)opens after start-up.

        Messages published while a connection was down are lost without a trace when they were
        the last ones, and an engine that restarted may have sent its first batches into the
        void (so its sequence can look continuous). Replaying from 0 settles both: batches
        already applied are recognised by their timestamps and skipped, batches below our
        sequence that we never saw mean a restart.
        """
        # A bound socket counts a peer once its handshake passed (the gate refuses strangers
        # after the TCP accept): a refused peer must not set off replays.
        # (The monitor comes from the socket's context, the asyncio one: an asyncio socket.)
        monitor = cast(zmq.asyncio.Socket, sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED if bind else zmq.EVENT_CONNECTED))
        try:
            while True:
                await monitor.recv_multipart()
                if not self.ready.is_set():
                    continue  # the start-up replays cover the first connections
                for source in self._groups.get((address, bind), []):
                    if source.replay_endpoint is None:
                        continue
                    streams = [st for k, st in self._streams.items()
                               if k[0] == source.backend_id and k[1] == source.topic]
                    for stream in streams or [self._stream(source, 0)]:
                        if not stream.replaying:
                            self._spawn_replay(stream, 0)
        finally:
            monitor.close(linger=0)

    # ---- live messages ----------------------------------------------------------------------

    def _read_live(self, sock: zmq.Socket[bytes], address: str, bind: bool) -> None:
        """Apply what a live socket holds: at most ``_DRAIN_FRAMES`` messages now, the rest on
        the next loop turn (an engine's backlog must not stall requests)."""
        for _ in range(_DRAIN_FRAMES):
            try:
                if sock.closed or not cast(int, sock.get(zmq.EVENTS)) & _POLLIN:
                    return
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # a socket error must not end ingestion for good
                if not sock.closed:
                    self.metrics.malformed.labels(address).inc()
                    log.warning("receiving KV events on %s failed: %s", address, exc)
                return  # the next edge, or the safety drain, tries again
            try:
                self._on_frames(frames, address, bind)
            except Exception:  # a loop callback: a bug on one message must not skip the rest
                log.exception("KV-event message on %s failed", address)
                self.metrics.malformed.labels(address).inc()
        asyncio.get_running_loop().call_soon(self._read_live, sock, address, bind)

    def _on_frames(self, frames: list[bytes], address: str, bind: bool) -> None:
        """One live message: decode it, find its source by topic, apply it in order."""
        sources = self._groups.get((address, bind), [])
        if not sources:
            return
        try:
            decoded = decode_live(frames)
        except WireError as exc:
            self.metrics.malformed.labels(sources[0].backend_id if len(sources) == 1
                                          else address).inc()
            log.debug("malformed KV-event message on %s: %s", address, exc)
            return
        source = next((s for s in sources if s.topic == decoded.topic), None)
        if source is None and len(sources) == 1 and not sources[0].topic:
            source = sources[0]
        if source is None:
            self.metrics.unknown_topic.inc()
            return
        try:
            self._on_live(self._stream(source, decoded.batch.data_parallel_rank), decoded)
        except Exception:  # a bug on one message must not stop ingestion
            log.exception("applying KV events from %s failed", source.backend_id)
            self.metrics.malformed.labels(source.backend_id).inc()

    def _stream(self, source: KvEventSource, rank: int) -> _Stream:
        key = (source.backend_id, source.topic, rank)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(source, rank)
        return stream

    def _on_live(self, stream: _Stream, decoded: DecodedBatch, after_replay: bool = False) -> None:
        if stream.replaying:
            stream.held.append(decoded)
            return
        expected = stream.next_seq
        seq = decoded.seq
        if expected is not None and seq < expected:
            if decoded.batch.ts <= stream.last_ts:
                return  # a copy of a batch a replay already applied
            self._restarted(stream, seq, expected)
            expected = None
        if (expected is None and seq == 0) or seq == expected:
            stream.gap_replays = 0
            self._apply(stream, decoded)
            return
        if stream.source.replay_endpoint is None:
            if expected is not None:
                self.metrics.gaps.labels(stream.source.backend_id).inc()
            self._apply(stream, decoded)
            return
        delay_s = 0.0
        if after_replay:  # the replay that just ended did not reach this message
            stream.gap_replays += 1
            if stream.gap_replays > self.max_gap_replays:
                self._resync(stream, decoded)
                return
            # The first retry at once (live messages may just have raced the replay's
            # snapshot), then backing off.
            if stream.gap_replays > 1:
                delay_s = self.replay_backoff_s * 2 ** (stream.gap_replays - 2)
        elif expected is not None:
            self.metrics.gaps.labels(stream.source.backend_id).inc()
        # A gap (or a first message that is not the stream's first): fill it from the buffer.
        stream.held.append(decoded)
        self._spawn_replay(stream, expected or 0, delay_s)

    def _resync(self, stream: _Stream, decoded: DecodedBatch) -> None:
        """Replays cannot reach ``decoded``: start the sequence anew from it, as after a
        restart (what the index held for the backend can no longer be trusted)."""
        backend = stream.source.backend_id
        self.metrics.resyncs.labels(backend).inc()
        log.warning("KV events from %s: %d replays did not reach seq %d (expected %s); "
                    "clearing its blocks and continuing from there", backend,
                    stream.gap_replays - 1, decoded.seq, stream.next_seq)
        stream.gap_replays = 0
        self._clear(stream)
        self._apply(stream, decoded)
        # Nor can its timestamp be trusted to tell copies of applied batches: one far in the
        # future would have every real batch that follows dropped as a copy.
        stream.last_ts = float("-inf")

    def _apply(self, stream: _Stream, decoded: DecodedBatch, replayed: bool = False) -> None:
        backend = stream.source.backend_id
        if decoded.skipped:
            self.metrics.malformed.labels(backend).inc(decoded.skipped)
        now_s = self._now_s()
        counted: dict[type, int] = {}
        for event in decoded.batch.events:
            try:
                stored = self.sink.apply(backend, event, now_s)
            except (ValueError, TypeError, OverflowError) as exc:
                # Bad data inside a well-formed message (e.g. a token id that is not a uint32):
                # skip that event, keep the sequence (the batch itself was received).
                self.metrics.malformed.labels(backend).inc()
                log.debug("KV event from %s not applied: %s", backend, exc)
                continue
            counted[type(event)] = counted.get(type(event), 0) + 1
            if self.on_stored is not None and isinstance(event, BlockStored):
                self.on_stored(backend, event, stored)
        # One metric update per batch and type, not per event (labels() takes a lock).
        for kind, n in counted.items():
            self.metrics.events.labels(backend, kind.__name__).inc(n)
        if replayed:  # its timestamp says when it was first published, not how late we are
            self.metrics.replayed.labels(backend).inc()
        else:
            self.metrics.lag.labels(backend).observe(max(0.0, self._wall_s() - decoded.batch.ts))
        stream.next_seq = decoded.seq + 1
        stream.last_ts = max(stream.last_ts, decoded.batch.ts)
        self.applied_batches += 1
        # "Live" means the index reflects the engine: not before a replay has caught up.
        if self.on_backend_live is not None and not stream.replaying:
            self.on_backend_live(backend)

    def _restarted(self, stream: _Stream, seq: int, expected: int) -> None:
        self.metrics.restarts.labels(stream.source.backend_id).inc()
        log.info("KV events from %s restarted at seq %d (expected %d): clearing its blocks",
                 stream.source.backend_id, seq, expected)
        self._clear(stream)
        stream.next_seq = None

    def _clear(self, stream: _Stream) -> None:
        self.sink.apply(stream.source.backend_id, AllBlocksCleared(), self._now_s())

    # ---- replay -----------------------------------------------------------------------------

    def _spawn_replay(self, stream: _Stream, start_seq: int, delay_s: float = 0.0) -> None:
        stream.replaying = True
        task = asyncio.get_running_loop().create_task(self._replay(stream, start_seq, delay_s))
        self._replay_tasks.add(task)
        task.add_done_callback(self._replay_tasks.discard)

    async def _replay(self, stream: _Stream, start_seq: int, delay_s: float = 0.0) -> None:
        backend = stream.source.backend_id
        assert self._ctx is not None and stream.source.replay_endpoint is not None
        if delay_s > 0:
            await asyncio.sleep(delay_s)  # live messages keep being held meanwhile
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        outcome = "ok"
        kept = False  # a restored stream kept its snapshot over a gap: as live as it gets
        try:
            sock.connect(stream.source.replay_address())
            await sock.send_multipart(replay_request(start_seq))
            first = True
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), self.replay_timeout_s)
                try:
                    decoded = decode_replay(frames)
                except WireError:
                    self.metrics.malformed.labels(backend).inc()
                    continue
                if decoded is None:
                    break
                expected = stream.next_seq
                if first and decoded.seq > max(start_seq, expected or 0):
                    outcome = "incomplete"
                    if stream.restored:
                        kept = True
                        self.metrics.warm_uncovered.labels(backend).inc()
                        log.warning("KV events from %s: the replay buffer starts at seq %d, "
                                    "past the snapshot's %d; keeping the snapshot's blocks",
                                    backend, decoded.seq, start_seq)
                    else:
                        self.metrics.unrecovered.labels(backend).inc()
                        self._clear(stream)
                first = False
                if expected is not None and decoded.seq < expected:
                    if decoded.batch.ts <= stream.last_ts:
                        continue  # already applied
                    # A batch below our sequence that we never saw: the engine restarted
                    # (and the first messages of its new life were lost on the way).
                    self._restarted(stream, decoded.seq, expected)
                self._apply(stream, decoded, replayed=True)
        except TimeoutError:
            outcome = "timeout"
        except zmq.ZMQError as exc:
            outcome = "error"
            log.warning("replay from %s failed: %s", backend, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            outcome = "error"
            log.exception("replay from %s failed", backend)
        finally:
            sock.close(linger=0)
            stream.restored = False
            self.metrics.replays.labels(backend, outcome).inc()
        if (outcome == "ok" or kept) and self.on_backend_live is not None:
            self.on_backend_live(backend)
        self._drain(stream)

    def _drain(self, stream: _Stream) -> None:
        """Apply live messages held during a replay, in order, skipping what it covered."""
        held = sorted(stream.held, key=lambda d: d.seq)
        stream.held = []
        stream.replaying = False
        for i, decoded in enumerate(held):
            if stream.next_seq is not None and decoded.seq < stream.next_seq:
                continue
            self._on_live(stream, decoded, after_replay=True)
            if stream.replaying:  # another gap: the new replay takes the rest
                stream.held.extend(held[i + 1 :])
                return

