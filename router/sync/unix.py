"""Replica sync between the processes of one host (``serve --workers``): Unix stream sockets
driven by the event loop, with no thread in between.

Each replica listens on its own socket path (``sync.bind: unix://PATH``). A sibling that
wants its messages connects there, as a ZeroMQ SUB connects to a PUB, and the listener
writes every frame to every connection, prefixed by its length (4 bytes, big-endian). Both
ends are asyncio protocols on the replica's own loop: a frame costs one ``write`` at the
sender and one ``read`` at each receiver.

Why not ZeroMQ here: a ZeroMQ socket hands each frame to a background I/O thread, which
writes it, and the receiver's I/O thread reads it and wakes the receiving thread through a
mailbox. That is two thread wake-ups per frame on each side. `serve --workers 2`
at concurrency 32, on 2 cores shared with the load and the backends, spent 6% of a worker's
samples in the send (py-spy), 3.5% in the I/O thread (perf), and a tenth of its perf samples
in the kernel's scheduler and reschedule interrupts. Between hosts ZeroMQ stays
(``router.sync.service``): its reconnects, ZAP gate and high-water marks earn their keep
there.

Frames to one connection arrive whole and in order. A receiver that stops reading does not
grow the sender's memory: past ``MAX_BUFFERED_BYTES`` queued for it, frames to it are dropped
and counted, as a ZeroMQ PUB drops at its high-water mark, and the sender's next state
repairs the peer's view. A frame announcing more than ``MAX_FRAME_BYTES`` closes that connection (nothing a
sibling sends comes near it), which is counted (``on_bad_frame``: the service's decode-error
counter) and reconnected on the next discovery round.
Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

__all__ = ["MAX_BUFFERED_BYTES", "MAX_FRAME_BYTES", "UnixLink", "is_unix", "unix_path"]

log = logging.getLogger("kvrouter.sync")

MAX_FRAME_BYTES = 1 << 26  # 64 MiB: a frame of thousands of messages is ~1 MB
MAX_BUFFERED_BYTES = 8 << 20  # queued for one receiver before frames to it are dropped
_HEADER_BYTES = 4
_SCHEME = "unix://"


def is_unix(endpoint: str) -> bool:
    return endpoint.startswith(_SCHEME)


def unix_path(endpoint: str) -> str:
    return endpoint[len(_SCHEME):]


def _listening(path: str) -> bool:
    """Whether a live process accepts connections at ``path`` (a local connect answers at
    once): its file must not be taken over."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class _Receiver(asyncio.Protocol):
    """One connection to a sibling's socket: splits the byte stream into frames."""

    def __init__(self, link: UnixLink, endpoint: str) -> None:
        self.link = link
        self.endpoint = endpoint
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        frames = []
        start, end = 0, len(buffer)
        while end - start >= _HEADER_BYTES:
            size = int.from_bytes(buffer[start:start + _HEADER_BYTES], "big")
            if size > MAX_FRAME_BYTES:
                log.warning("replica sync: %s announced a %d-byte frame; reconnecting",
                            self.endpoint, size)
                if self.link.on_bad_frame is not None:
                    self.link.on_bad_frame()
                assert self._transport is not None
                self._transport.abort()
                buffer.clear()
                return
            if end - start - _HEADER_BYTES < size:
                break
            start += _HEADER_BYTES
            frames.append(bytes(buffer[start:start + size]))
            start += size
        del buffer[:start]
        if frames:
            self.link.on_frames(frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.link._lost(self.endpoint, self)


class _Sender(asyncio.Protocol):
    """A sibling connected to this replica's socket: it only ever reads from us (anything it
    sends is dropped by ``asyncio.Protocol``'s own ``data_received``)."""

    def __init__(self, link: UnixLink) -> None:
        self.link = link
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.link._senders.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link._senders.discard(self)


class UnixLink:
    """One replica's end: listens at ``path`` for siblings to read its frames, and connects
    to siblings' paths to read theirs, handing each batch of whole frames to ``on_frames``."""

    def __init__(self, path: str, on_frames: Callable[[list[bytes]], None],
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                 on_bad_frame: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_frames = on_frames
        self.on_bad_frame = on_bad_frame  # e.g. a metric: a connection closed for a bad length
        self.max_buffered_bytes = max_buffered_bytes
        self._server: asyncio.AbstractServer | None = None
        self._senders: set[_Sender] = set()
        self._receivers: dict[str, _Receiver] = {}

    async def start(self) -> None:
        if _listening(self.path):
            raise OSError(f"replica sync: another process listens on {self.path}")
        # A socket file left by a replica that was killed would make bind fail.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Sender(self), self.path)

    def send(self, frames: list[bytes]) -> int:
        """Write ``frames`` to every connected sibling; returns how many siblings missed them
        (their queue is full). Never blocks: the transports queue what the kernel did not
        take."""
        if not self._senders:
            return 0
        data = b"".join(len(f).to_bytes(_HEADER_BYTES, "big") + f for f in frames)
        missed = 0
        for sender in self._senders:
            transport = sender.transport
            if transport is None or transport.is_closing():
                continue
            if transport.get_write_buffer_size() > self.max_buffered_bytes:
                missed += 1
                continue
            transport.write(data)
        return missed

    async def connect(self, endpoint: str) -> bool:
        """Read ``endpoint``'s frames from now on; False when nothing listens there yet (the
        next discovery round tries again)."""
        if endpoint in self._receivers:
            return True
        loop = asyncio.get_running_loop()
        receiver = _Receiver(self, endpoint)
        try:
            await loop.create_unix_connection(lambda: receiver, unix_path(endpoint))
        except OSError as exc:
            log.debug("replica sync: %s not reachable yet: %s", endpoint, exc)
            return False
        if receiver.lost:  # closed again before this coroutine resumed: not connected
            return False
        self._receivers[endpoint] = receiver
        return True

    def disconnect(self, endpoint: str) -> None:
        receiver = self._receivers.pop(endpoint, None)
        if receiver is not None and receiver._transport is not None:
            receiver._transport.close()

    def connected(self) -> frozenset[str]:
        return frozenset(self._receivers)

    def _lost(self, endpoint: str, receiver: _Receiver) -> None:
        if self._receivers.get(endpoint) is receiver:
            del self._receivers[endpoint]  # the sibling went away: rediscovery reconnects

    async def close(self) -> None:
        for endpoint in list(self._receivers):
            self.disconnect(endpoint)
        for sender in list(self._senders):
            if sender.transport is not None:
                sender.transport.abort()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
