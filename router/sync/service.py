"""The replica-sync service: ZeroMQ PUB/SUB between router replicas (Unix sockets between
the workers of one host).

Each replica binds one PUB socket (``sync.port``, or ``sync.bind``) and publishes the
dispatches its peers must record and its own state (``router.sync.wire``,
``policies.replica_sync``); it connects one SUB socket to
every peer's PUB socket as discovery finds them (``router.sync.peers``) and applies what
arrives to its ``policies.replica_sync.ReplicaSync``. A ``unix://`` bind (``serve
--workers``) swaps both sockets for ``router.sync.unix``'s link, which the event loop drives
with no I/O thread; everything else here is the same for both. ``wrap(policy)`` gives the
app the policy it routes with: the inner policy over the fleet's in-flight view, publishing
its own lifecycle (``SyncedPolicy``); the proxy does not know.

Only peers may subscribe: the PUB socket is gated by ZAP like the KV-event sockets
(``router.kv.auth``), with the peers' IPs (and ``sync.allow_from``); forged lifecycle would
skew every replica's view, so the SUB side connects only to discovered peers (the router
chose them, as for engines that bind). ipc:// endpoints (``serve --workers``) are local
files, not gated.

Messages leave in windows (``ReplicaSync.flush``): the first change to this replica's own
work (a dispatch, a first token, a finish) or a heartbeat opens one, and
``sync.flush_interval_s`` (2 ms) later it leaves as one multipart message (one frame for the
lot with ``sync.batch_frames``: ``wire.encode_batch``): the dispatches to share, then the
replica's ``State``, built once for the window. The send does not block (PUB drops at its
high-water mark rather than wait; counted).
Sending per loop turn cost `serve --workers 2` ~12% of a worker's CPU in ZeroMQ sends alone at concurrency 32 (py-spy; one send per 1-2 requests), and as much again in
the siblings' wake-ups; a 2 ms window adds 2 ms of sync lag, against engine metrics scraped
once a second.

The two sockets are plain (blocking-API) ZeroMQ sockets driven by the event loop, not
``zmq.asyncio`` ones: a send is one non-blocking call, and receiving drains the SUB socket
whenever its file descriptor signals (``_drain``). Through ``zmq.asyncio`` each frame cost a
future on both sides: 38 against 15 us of CPU per frame sent and received in one process
(``serve --workers 2`` sends and receives ~500 frames a second per worker at concurrency 32).
ZeroMQ's descriptor is edge-triggered (it signals a change, not readability), so a drain reads
until ``EVENTS`` says nothing is left, and the heartbeat tick drains too, in case an edge is
missed. Loops and callbacks catch, log and count their errors and go on; none swallows
``CancelledError``. Metrics: ``kvrouter_sync_peers``, ``kvrouter_sync_lag_seconds``,
``kvrouter_sync_messages_total{direction}``, ``kvrouter_sync_dropped_messages_total``,
``kvrouter_sync_decode_errors_total``, ``kvrouter_sync_peers_expired_total``,
``kvrouter_sync_peer_in_flight_requests``, ``kvrouter_sync_connections_refused_total``.
Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge

from policies.base import needs_prompt_text
from policies.replica_sync import ReplicaSync, State, SyncedPolicy
from policies.types import Policy
from router.config import Config
from router.config.sync import SyncConfig
from router.kv.auth import EventSocketGate
from router.sync.peers import PeerFinder, endpoint_host, kube_config
from router.sync.unix import UnixLink, is_unix, unix_path
from router.sync.wire import WireError, decode_frame, encode, encode_batch

__all__ = ["SyncMetrics", "SyncService", "build_sync"]

log = logging.getLogger("kvrouter.sync")

_SEND_HWM = 100_000  # messages queued per subscriber before PUB drops (counted as send drops)
_POLLIN = int(zmq.POLLIN)  # a plain int: ``& zmq.POLLIN`` builds an enum member (router.kv.events)
_RETRY_S = 0.05  # how soon a peer that could not be reached is tried again


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.peers = Gauge("kvrouter_sync_peers", "Router replicas heard from recently.",
                           registry=r)
        self.subscribed = Gauge("kvrouter_sync_subscribed_endpoints",
                                "Peer PUB endpoints this replica's SUB socket connects to.",
                                registry=r)
        self.lag = Gauge("kvrouter_sync_lag_seconds",
                         "Largest receive - send time of the latest message of each peer "
                         "(wall clocks: includes skew between hosts).", registry=r)
        self.messages = Counter("kvrouter_sync_messages", "Replica-sync messages.",
                                ["direction"], registry=r)
        self.received = self.messages.labels("received")  # per frame: looked up once
        self.dropped = Counter("kvrouter_sync_dropped_messages",
                               "Peers' messages lost in transit (sequence gaps), and own "
                               "messages the PUB socket could not queue.", ["side"], registry=r)
        self.decode_errors = Counter("kvrouter_sync_decode_errors",
                                     "Sync messages that could not be decoded; skipped.",
                                     registry=r)
        self.expired = Counter("kvrouter_sync_peers_expired",
                               "Peers dropped after going silent (their in-flight share "
                               "expired).", registry=r)
        self.peer_in_flight = Gauge("kvrouter_sync_peer_in_flight_requests",
                                    "Peers' requests in flight, as this replica sees them.",
                                    registry=r)
        self.refused = Counter("kvrouter_sync_connections_refused",
                               "Connections to the sync socket refused: not a peer's address.",
                               registry=r)


class SyncService:
    def __init__(self, config: SyncConfig, environ: Mapping[str, str]) -> None:
        self.config = config
        self.origin = config.replica_id or (
            f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}")
        self._kube = kube_config(config, environ)
        self.sync: ReplicaSync | None = None
        self.metrics: SyncMetrics | None = None
        self._sub: zmq.Socket[bytes] | None = None  # ZeroMQ only: drained by _drain
        # Hands a flush's frames to the transport; returns how many receivers missed them.
        # None until the transport is up (and after it is down).
        self._send: Callable[[list[bytes]], int] | None = None
        self._sent: Any = None  # kvrouter_sync_messages_total{direction="sent"}, looked up once
        # Called after a frame with a peer's state was applied (the app: wake a held request)
        self.on_peer_state: Callable[[], None] | None = None
        self._send_text = True  # set by wrap() from the policy (sync.send_prompt_text)
        self._reported_dropped = 0
        self._reported_expired = 0

    def wrap(self, policy: Policy) -> SyncedPolicy:
        self.sync = ReplicaSync(self.origin, policy, self.config.params())
        send = self.config.send_prompt_text
        self._send_text = needs_prompt_text(policy) if send is None else send
        return SyncedPolicy(policy, self.sync, self._schedule)

    def _schedule(self) -> None:
        """A window opened (``ReplicaSync.open_window``): flush it ``flush_interval_s`` on."""
        if self._send is None:  # not started yet (or stopped): peers will not hear of it
            assert self.sync is not None
            self.sync.flush(time.monotonic())  # and the window must not stay open
            return
        delay_s = self.config.flush_interval_s
        loop = asyncio.get_running_loop()
        if delay_s:
            loop.call_later(delay_s, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the window as one multipart ZeroMQ message (one send here, one wake-up at
        each peer)."""
        send, sync = self._send, self.sync
        if sync is None:
            return
        mono, unix = time.monotonic(), time.time()
        batch = sync.flush(mono)
        if send is None or not batch:
            return
        if self.config.batch_frames:
            frames = [encode_batch(batch, monotonic_now_s=mono, unix_now_s=unix,
                                   prompt_text=self._send_text)]
        else:
            frames = [encode(m, monotonic_now_s=mono, unix_now_s=unix,
                             prompt_text=self._send_text) for m in batch]
        missed = send(frames)
        if self.metrics is not None:
            if missed:
                self.metrics.dropped.labels("send").inc(len(batch) * missed)
            self._sent.inc(len(batch))

    async def run(self, state: Any) -> None:
        """The background task (``create_app(background=...)``): the transport, then the
        heartbeat and discovery loops."""
        assert self.sync is not None, "wrap() the policy before running the service"
        self.metrics = SyncMetrics(state.metrics.registry)
        self._sent = self.metrics.messages.labels("sent")
        if is_unix(self.config.endpoint):
            await self._run_unix(self.metrics)
        else:
            await self._run_zmq(self.metrics)

    async def _run_unix(self, metrics: SyncMetrics) -> None:
        # A frame of impossible length is counted with the undecodable ones.
        link = UnixLink(unix_path(self.config.endpoint), self._receive,
                        on_bad_frame=metrics.decode_errors.inc)
        await link.start()
        self._send = link.send
        try:
            log.info("replica sync: %s listening on %s", self.origin, self.config.endpoint)
            await asyncio.gather(self._tick(), self._discover(link, None))
        finally:
            self._send = None
            await link.close()

    async def _run_zmq(self, metrics: SyncMetrics) -> None:
        context = zmq.asyncio.Context()
        tcp = self.config.endpoint.startswith("tcp://")
        gate = EventSocketGate(metrics, self.config.allow_from, what="replica-sync")
        # Plain sockets on the asyncio context (its ZAP authenticator): see the module docstring.
        pub: zmq.Socket[bytes] = zmq.Socket(context, zmq.PUB)
        sub: zmq.Socket[bytes] = zmq.Socket(context, zmq.SUB)
        loop = asyncio.get_running_loop()
        fd = -1
        try:
            if tcp:
                gate.start(context)
                gate.protect(pub)
            pub.setsockopt(zmq.SNDHWM, _SEND_HWM)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(self.config.endpoint)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.LINGER, 0)
            link = _ZmqLink(pub, sub)
            self._sub, self._send = sub, link.send
            fd = cast(int, sub.get(zmq.FD))
            loop.add_reader(fd, self._drain)
            log.info("replica sync: %s publishing on %s", self.origin, self.config.endpoint)
            await asyncio.gather(self._tick(), self._discover(link, gate if tcp else None))
        finally:
            if fd >= 0:
                loop.remove_reader(fd)
            self._sub = self._send = None
            gate.stop()
            pub.close(0)
            sub.close(0)
            context.term()

    def _drain(self, limit: int = 64) -> None:
        """Apply what the SUB socket holds: at most ``limit`` frames now, the rest on the next
        loop turn (a peer's backlog must not stall this replica's requests)."""
        sub, metrics = self._sub, self.metrics
        if sub is None or metrics is None:
            return
        for _ in range(limit):
            try:
                if not cast(int, sub.get(zmq.EVENTS)) & _POLLIN:
                    return
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # closed under us (stopping), or a socket error
                log.warning("replica sync: receive failed: %s", exc)
                return
            self._apply(frames, metrics)
        asyncio.get_running_loop().call_soon(self._drain)

    def _receive(self, frames: list[bytes]) -> None:
        if self.metrics is not None:
            self._apply(frames, self.metrics)

    def _apply(self, frames: list[bytes], metrics: SyncMetrics) -> None:
        assert self.sync is not None
        sync = self.sync
        mono, unix = time.monotonic(), time.time()
        for data in frames:
            try:
                messages = decode_frame(data, monotonic_now_s=mono, unix_now_s=unix)
            except WireError as exc:
                metrics.decode_errors.inc()
                log.debug("undecodable sync message: %s", exc)
                continue
            if not messages or messages[0].origin == self.origin:
                continue  # our own, through a subscription to ourselves
            metrics.received.inc(len(messages))
            for message in messages:
                try:
                    sync.receive(message, mono)
                except Exception:  # a policy hook failing on a peer's data must not stop sync
                    metrics.decode_errors.inc()
                    log.exception("applying a sync message from %s failed", message.origin)
            if self.on_peer_state is not None and isinstance(messages[-1], State):
                self.on_peer_state()  # (a window's state is its frame's last message)

    async def _tick(self) -> None:
        assert self.sync is not None and self.metrics is not None
        sync, metrics = self.sync, self.metrics
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            try:
                self._drain()  # an edge ZeroMQ's descriptor did not signal is caught here
                now = time.monotonic()
                if sync.heartbeat():  # a State: liveness, and it heals a lost one
                    self._schedule()
                sync.expire(now)
                metrics.peers.set(len(sync.peers))
                metrics.lag.set(sync.max_lag_s())
                metrics.peer_in_flight.set(sync.peer_in_flight())
                dropped = sync.dropped()
                # Dropped peers take their counts with them: count only increases.
                if dropped > self._reported_dropped:
                    metrics.dropped.labels("receive").inc(dropped - self._reported_dropped)
                self._reported_dropped = dropped
                if sync.peers_expired > self._reported_expired:
                    metrics.expired.inc(sync.peers_expired - self._reported_expired)
                    self._reported_expired = sync.peers_expired
            except Exception:
                log.exception("replica sync heartbeat failed")

    async def _discover(self, link: _Link, gate: EventSocketGate | None) -> None:
        assert self.metrics is not None
        finder = PeerFinder(self.config, self._kube)
        own = self.config.endpoint
        while True:
            unreached = False
            try:
                found = await finder.find()
                for endpoint in sorted(found - link.connected() - {own}):
                    if await link.connect(endpoint):
                        log.info("replica sync: subscribed to peer %s", endpoint)
                    else:
                        unreached = True
                for endpoint in sorted(link.connected() - found):
                    link.disconnect(endpoint)
                if gate is not None:
                    gate.set_hosts(h for e in found if (h := endpoint_host(e)) is not None)
                self.metrics.subscribed.set(len(link.connected()))
            except Exception:
                log.exception("replica sync: peer discovery failed")
            # A Unix peer not listening yet (a sibling worker still starting) is tried again
            # soon: until then this replica routes blind to that peer's requests. ZeroMQ
            # connects never fail; it retries by itself.
            interval_s = self.config.discover_interval_s
            await asyncio.sleep(min(interval_s, _RETRY_S) if unreached else interval_s)


class _Link(Protocol):
    """A transport's subscribing side, as discovery drives it (``_ZmqLink``, ``UnixLink``)."""

    async def connect(self, endpoint: str) -> bool: ...

    def disconnect(self, endpoint: str) -> None: ...

    def connected(self) -> frozenset[str]: ...


class _ZmqLink:
    """The PUB socket's send and the SUB socket's subscriptions (receiving is ``_drain``)."""

    def __init__(self, pub: zmq.Socket[bytes], sub: zmq.Socket[bytes]) -> None:
        self.pub = pub
        self.sub = sub
        self._endpoints: set[str] = set()

    def send(self, frames: list[bytes]) -> int:
        try:
            self.pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return 1
        return 0

    async def connect(self, endpoint: str) -> bool:
        try:
            self.sub.connect(endpoint)  # returns at once: ZeroMQ connects (and retries) itself
        except zmq.ZMQError as exc:
            log.warning("replica sync: cannot connect to peer %s: %s", endpoint, exc)
            return False
        self._endpoints.add(endpoint)
        return True

    def disconnect(self, endpoint: str) -> None:
        self.sub.disconnect(endpoint)
        self._endpoints.discard(endpoint)

    def connected(self) -> frozenset[str]:
        return frozenset(self._endpoints)


def build_sync(config: Config, environ: Mapping[str, str]) -> SyncService | None:
    """The service for ``config``'s ``sync:`` section, None when it is off. ``environ`` is
    read only for the Kubernetes service account's address (label-selected peers)."""
    section = config.sync
    if not section.enabled:
        return None
    return SyncService(section, environ)
