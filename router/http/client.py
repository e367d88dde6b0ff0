"""A lean HTTP/1.1 client for the proxy's hot path: keep-alive connections per backend.

aiohttp's ClientSession spends more CPU per request than everything else in the router
together (bench/README.md); the proxy needs only a small part of it: send a request head and
a body as given, read a status, headers and a body framed by Content-Length, chunked encoding
or connection close, chunk by chunk as it arrives. This module does exactly that on an
``asyncio.Protocol``, with the three timeouts the proxy needs (connect, first byte, idle
read) as loop timers. A streamed answer can also be relayed (``UpstreamResponse.relay``):
each read's body goes to the client from this protocol's own callback, so a token costs no
task wake-up, future or timer of its own. A request on a reused connection that the backend had already closed
(no response byte yet) is resent once on a fresh connection; anything else is the caller's
to retry. Health checks and background loops keep using aiohttp.

Must not import other ``router`` modules.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

__all__ = ["ConnectFailed", "HeadTimeout", "HttpClient", "ResponseBroken", "UpstreamResponse"]

_MAX_HEAD_BYTES = 64 * 1024
_HIGH_WATER_BYTES = 256 * 1024
_COPY_BELOW_BYTES = 64 * 1024
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ConnectFailed(Exception):
    """No connection could be opened (refused, unreachable, connect timeout)."""


class HeadTimeout(Exception):
    """The backend sent no response head within the first-byte timeout."""


class ResponseBroken(Exception):
    """The connection broke, stalled past the idle timeout, or spoke bad HTTP."""


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout_s: float) -> None:
        self._loop = loop
        self._idle_timeout_s = idle_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.got_bytes = False
        self._buf = bytearray()
        self._state = _DONE
        self._remaining = 0
        self._keep_alive = False
        self._head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        # While ``relay`` runs: where each read's body bytes go, from this protocol's own
        # callback (no task woken per chunk), and what that call raised.
        self._sink: Callable[[bytes, bool], bool] | None = None
        self._sink_error: Exception | None = None
        self._end_handed = False
        self._last_data_s = 0.0
        self._relay_timer: asyncio.TimerHandle | None = None
        # Called once when the connection is gone (aborted or lost): frees its pool slot.
        self.on_gone: Callable[[], None] | None = None

    def _gone(self) -> None:
        on_gone, self.on_gone = self.on_gone, None
        if on_gone is not None:
            on_gone()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._gone()
        if self._state == _UNTIL_CLOSE:
            self._finish()
        elif self._state != _DONE:
            self._fail(ResponseBroken("the backend closed the connection mid-response"))

    def data_received(self, data: bytes) -> None:
        if self._state == _DONE:
            self._abort()  # bytes nobody asked for: the connection cannot be trusted
            return
        self.got_bytes = True
        self._buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._fail(ResponseBroken(f"bad HTTP from the backend: {exc}"))
            self._abort()
            return
        if self._sink is not None and (self._chunks or self._state == _DONE):
            self._to_sink(self._sink)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    # -- sending -----------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes, head_only: bool) -> None:
        assert self.transport is not None
        self._state = _HEAD
        self._head_only = head_only
        self._buf.clear()
        self._chunks.clear()
        self._buffered = 0
        self._error = None
        self.got_bytes = False
        self._head = self._loop.create_future()
        if len(body) > _COPY_BELOW_BYTES:
            self.transport.writelines((head, body))
        else:
            # One buffer, one send: copying a small body is cheaper than a second syscall.
            self.transport.write(head + body)

    # -- parsing -----------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while buf:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        raise ValueError("response head too large")
                    return
                self._on_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif state == _LENGTH or state == _CHUNK_DATA:
                take = min(self._remaining, len(buf))
                self._push(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    if state == _LENGTH:
                        self._finish()
                    else:
                        self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise ValueError("missing CRLF after a chunk")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ValueError("chunk size line too long")
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining, self._state = size, _CHUNK_DATA
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish()
            elif state == _UNTIL_CLOSE:
                self._push(bytes(buf))
                buf.clear()
            else:
                raise ValueError("data after the end of the response")

    def _on_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
            # A bare CR or LF inside a line: headers relayed as received could smuggle a
            # line break to the client, so such a head is refused.
            raise ValueError("a bare CR or LF in the response head")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1 status line: {lines[0][:40]!r}")
        status = int(rest[:3])
        headers: list[tuple[bytes, bytes]] = []
        length = -1
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                connection = value.lower()
            headers.append((name, value))
        if 100 <= status < 200:
            return  # an interim response (100 Continue): the real head follows
        self._keep_alive = version == b"HTTP/1.1" and b"close" not in connection
        if self._head_only or status in (204, 304):
            self._state, self._remaining = _LENGTH, 0
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length >= 0:
            self._state, self._remaining = _LENGTH, length
        else:
            self._state, self._keep_alive = _UNTIL_CLOSE, False
        assert self._head is not None
        if not self._head.done():
            self._head.set_result((status, headers))
        if self._state == _LENGTH and self._remaining == 0:
            self._finish()

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        if self._sink is None:
            self._wake()  # (with a sink, data_received hands the read over when it is parsed)

    def _finish(self) -> None:
        self._state = _DONE
        self._wake()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._state = _DONE
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _abort(self) -> None:
        self.closed = True
        self._gone()
        if self.transport is not None:
            self.transport.abort()

    # -- reading (by UpstreamResponse) -------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._state == _DONE and self._error is None and not self._chunks

    async def read_chunk(self) -> bytes:
        while not self._chunks:
            if self._state == _DONE:
                if self._error is not None:
                    raise self._error
                return b""
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(self._idle_timeout_s, self._on_idle_timeout)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        data = self._take_chunks()
        if self._paused and self.transport:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _on_idle_timeout(self) -> None:
        self._fail(ResponseBroken(f"no data from the backend for {self._idle_timeout_s} s"))
        self._abort()

    def _take_chunks(self) -> bytes:
        """All that has arrived, in one piece: one write to the client instead of one per
        upstream HTTP chunk of the same read, and nothing waits for more to arrive."""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    def _to_sink(self, sink: Callable[[bytes, bool], bool]) -> None:
        """Hand what this read parsed (and the end, when it came) to the relay's sink, from
        the protocol callback. The relay task wakes only at the end, on an error, or when the
        receiver is full (the backend is then not read until it drains)."""
        end = self._state == _DONE and self._error is None
        self._last_data_s = self._loop.time()
        try:
            more = sink(self._take_chunks() if self._chunks else b"", end)
        except Exception as exc:  # the receiver is gone: the relay task raises it
            self._sink, self._sink_error = None, exc
            self._wake()
            return
        if end:
            self._sink, self._end_handed = None, True
            self._wake()
        elif not more:
            self._sink = None
            if self.transport is not None and not self._paused:
                self._paused = True
                self.transport.pause_reading()
            self._wake()
        elif self._paused and self.transport is not None:
            # A read past the high-water mark paused the backend; all of it is handed over.
            self._paused = False
            self.transport.resume_reading()

    def _on_relay_idle(self) -> None:
        # One timer per wait, pushed back by the time data last came (not one per chunk).
        quiet_s = self._loop.time() - self._last_data_s
        if quiet_s < self._idle_timeout_s:
            self._relay_timer = self._loop.call_later(self._idle_timeout_s - quiet_s,
                                                      self._on_relay_idle)
            return
        self._relay_timer = None
        self._on_idle_timeout()

    async def relay(self, sink: Callable[[bytes, bool], bool],
                    drain: Callable[[], Awaitable[None]]) -> None:
        """Hand the rest of the body to ``sink(data, end)`` as it arrives, from this
        protocol's ``data_received``: a streamed answer then costs no task wake-up, future or
        timer per chunk. ``end`` is true on the call that carries the body's clean end (its
        data may be empty); ``sink`` returns false while its receiver is full, and the
        backend is not read until ``drain()`` returns. Raises ``ResponseBroken`` as
        ``read_chunk`` does (after handing over what arrived before the break), and whatever
        ``sink`` raised."""
        self._end_handed = False
        while True:
            if self._chunks or self._state == _DONE:
                end = self._state == _DONE and self._error is None
                if self._chunks or end:
                    more = sink(self._take_chunks() if self._chunks else b"", end)
                    if not end and not more:
                        await drain()
                if self._state == _DONE:
                    if self._error is not None:
                        raise self._error
                    return
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
            self._sink = sink
            self._waiter = self._loop.create_future()
            self._last_data_s = self._loop.time()
            self._relay_timer = self._loop.call_later(self._idle_timeout_s, self._on_relay_idle)
            try:
                await self._waiter
            finally:
                self._sink = None
                self._waiter = None
                if self._relay_timer is not None:
                    self._relay_timer.cancel()
                    self._relay_timer = None
            if self._sink_error is not None:
                error, self._sink_error = self._sink_error, None
                raise error
            if self._end_handed:
                return
            if self._state != _DONE:  # the receiver is full
                await drain()

    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.closed


class UpstreamResponse:
    """One response; ``release()`` (or ``close()``) must be called exactly once.
    ``raw_headers`` are (lower-case name, value) as bytes, as received."""

    __slots__ = ("_client", "_conn", "_key", "raw_headers", "status")

    def __init__(self, client: HttpClient, key: tuple[str, int, bool], conn: _Connection,
                 status: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self._client = client
        self._key = key
        self._conn = conn
        self.status = status
        self.raw_headers = raw_headers

    @property
    def content_type(self) -> str:
        for name, value in self.raw_headers:
            if name == b"content-type":
                return value.split(b";", 1)[0].strip().lower().decode("latin-1")
        return ""

    async def read_chunk(self) -> bytes:
        """All of the body that arrived since the last call (waits for some); b"" at the end.
        Raises ResponseBroken."""
        return await self._conn.read_chunk()

    async def relay(self, sink: Callable[[bytes, bool], bool],
                    drain: Callable[[], Awaitable[None]]) -> None:
        """The rest of the body into ``sink`` as it arrives, without a wake-up per chunk
        (``_Connection.relay``)."""
        await self._conn.relay(sink, drain)

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Give the connection back for reuse if the response was read to its end."""
        self._client._put(self._key, self._conn)

    def close(self) -> None:
        """Drop the connection now: the backend sees a disconnect and stops generating."""
        self._conn._abort()


class HttpClient:
    """Keep-alive connections per backend. With ``max_connections`` (0: no limit) at most
    that many are open to all backends together: a request that needs a new one first
    closes an idle connection to another backend, else waits (first come, first served) up
    to the connect timeout for one to close, as aiohttp's connector limit does."""

    def __init__(self, connect_timeout_s: float, first_byte_timeout_s: float,
                 read_idle_timeout_s: float, max_idle_per_backend: int = 256,
                 max_connections: int = 0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = read_idle_timeout_s
        self._max_idle = max_idle_per_backend
        self._max_connections = max_connections
        self.open_connections = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._targets: dict[str, tuple[tuple[str, int, bool], bytes, bytes]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def _target(self, base_url: str) -> tuple[tuple[str, int, bool], bytes, bytes]:
        """(connection key, Host header line, path prefix) of a backend base URL, memoised."""
        target = self._targets.get(base_url)
        if target is None:
            parts = urlsplit(base_url)
            tls = parts.scheme == "https"
            host = parts.hostname or "127.0.0.1"
            port = parts.port or (443 if tls else 80)
            target = ((host, port, tls), f"Host: {parts.netloc}\r\n".encode(),
                      parts.path.rstrip("/").encode())
            self._targets[base_url] = target
        return target

    async def request(self, base_url: str, method: str, path: bytes,
                      headers: Iterable[tuple[bytes, bytes]] | bytes,
                      body: bytes, sent: Callable[[], object] | None = None) -> UpstreamResponse:
        """Send one request and wait for the response head (not the body). ``headers`` are
        (name, value) pairs or ready header lines (``b"name: value\\r\\n"`` each).

        ``sent`` (the caller's bookkeeping of the dispatch) is called exactly once, before the
        first suspension: right after the request's bytes are written when a kept-alive
        connection is at hand, so the backend starts on it that much sooner; before
        connecting when none is, so nothing else runs between the caller's decision and its
        bookkeeping either way (at the latest, if this raises first)."""
        call = sent
        try:
            key, host_line, prefix = self._target(base_url)
            if not isinstance(headers, bytes):
                headers = b"".join([b"%b: %b\r\n" % (n, v) for n, v in headers])
            head = b"%b %b%b HTTP/1.1\r\n%b%bContent-Length: %d\r\n\r\n" % (
                method.encode(), prefix, path, host_line, headers, len(body))
            for _ in range(2):
                conn, reused = self._take(key)
                if conn is None:
                    if call is not None:
                        now, call = call, None
                        now()
                    await self._reserve()
                    conn = await self._open(key)
                conn.send(head, body, head_only=method == "HEAD")
                if call is not None:
                    now, call = call, None
                    try:
                        now()
                    except BaseException:
                        conn._abort()  # its answer would have no reader
                        raise
                assert conn._head is not None
                timer = asyncio.get_running_loop().call_later(
                    self._first_byte_timeout_s, _head_timeout, conn)
                stale = False
                try:
                    status, response_headers = await conn._head
                except ResponseBroken:
                    if not reused or conn.got_bytes:
                        raise
                    stale = True  # (a `continue` here: mypyc compiles none inside try/finally)
                except BaseException:
                    conn._abort()
                    raise
                finally:
                    timer.cancel()
                if stale:
                    continue  # a stale keep-alive connection: resend once on a fresh one
                return UpstreamResponse(self, key, conn, status, response_headers)
            raise ResponseBroken("the backend closed two connections before answering")
        finally:
            if call is not None:  # raised before it ran
                call()

    def _take(self, key: tuple[str, int, bool]) -> tuple[_Connection | None, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        return None, False

    def _put(self, key: tuple[str, int, bool], conn: _Connection) -> None:
        if not conn.reusable() or self._slot_waiters:
            conn._abort()  # with requests waiting for a slot, this one's goes to the first
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self._max_idle:
            conn._abort()
        else:
            idle.append(conn)

    # -- the connection limit ---------------------------------------------------------------

    async def _reserve(self) -> None:
        """Take a slot for a new connection (every open connection holds one)."""
        limit = self._max_connections
        while limit and self.open_connections >= limit:
            idle = next((conns.pop() for conns in self._idle.values() if conns), None)
            if idle is None:
                break
            idle._abort()  # frees its slot at once, to us or to an earlier waiter
        if not limit or self.open_connections < limit:
            self.open_connections += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await waiter  # a closing connection hands its slot over
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._free_slot()  # handed over just as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(
                    f"no free connection within {self._connect_timeout_s} s "
                    f"(upstream.max_connections {limit})") from None
            raise

    def _free_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.open_connections -= 1

    async def _open(self, key: tuple[str, int, bool]) -> _Connection:
        """A new connection on a slot already taken (``open_connections``): the slot goes
        back if the connect fails, and with the connection once it is gone."""
        try:
            conn = await self._connect(key)
        except BaseException:
            self._free_slot()
            raise
        conn.on_gone = self._free_slot
        return conn

    async def _connect(self, key: tuple[str, int, bool]) -> _Connection:
        host, port, tls = key
        loop = asyncio.get_running_loop()
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                transport, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._idle_timeout_s), host, port,
                    ssl=self._ssl if tls else None)
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"{exc.__class__.__name__}: {exc}") from None
        # uvloop may call connection_made after create_connection returns; its transports
        # are not asyncio.Transport subclasses (connection_made casts).
        conn.transport = transport
        return conn

    async def preconnect(self, base_url: str, count: int) -> int:
        """Open connections to ``base_url`` until ``count`` idle ones are ready for requests
        (never past ``max_connections``); returns how many were opened. A backend that
        refuses keeps what it has: the next request connects (and fails over) as usual."""
        key = self._target(base_url)[0]
        idle = self._idle.setdefault(key, [])
        idle[:] = [c for c in idle if not c.closed]
        opened = 0
        while len(idle) < min(count, self._max_idle):
            limit = self._max_connections
            if (limit and self.open_connections >= limit) or self._slot_waiters:
                break  # never take a slot a request could use
            self.open_connections += 1
            try:
                conn = await self._open(key)
            except ConnectFailed:
                break
            if self._closed:  # close() ran while it connected: nothing may stay open
                conn._abort()
                break
            idle = self._idle.setdefault(key, [])
            idle.append(conn)
            opened += 1
        return opened

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn._abort()
        self._idle.clear()


def _head_timeout(conn: _Connection) -> None:
    if conn._head is not None and not conn._head.done():
        conn._head.set_exception(HeadTimeout())
        conn._state = _DONE
        conn._abort()
