"""A lean HTTP/1.1 server for the router's client side: one ``asyncio.Protocol`` per connection.

aiohttp's server machinery (request objects, the dispatcher, middlewares, the payload writer)
cost about a quarter of the router's CPU per proxied request (bench/README.md), and a
router's client side needs little of it: parse a request (``httptools``, the llhttp parser
uvicorn uses, does the framing: Content-Length, chunked bodies, keep-alive rules), hand it
to one handler with its body in memory, and write the handler's answer in one ``write`` or,
for streams, chunk by chunk with flow control. The request and response objects live in
``router.http_messages``.

Behaviour a proxy relies on:

- A client that goes away (connection lost) cancels its request's handler task at once, as
  aiohttp's ``handler_cancellation`` did: the proxy then drops the upstream request.
- A body over ``max_body_bytes`` (by Content-Length, or while a chunked body arrives) is not
  buffered: the handler runs at once and ``Request.read`` raises ``BodyTooLarge``; the
  connection closes after the answer, so nothing of the rest of that body is misread as a
  next request. ``Expect: 100-continue`` is answered only for bodies within the limit.
- Pipelined requests on one connection are answered in order (reading pauses while 32 wait);
  a connection closes when it has been idle, or sending an incomplete request head, for
  ``keepalive_timeout_s``.
- A request body must arrive whole within ``body_timeout_s`` of its head; else the request
  gets ``errors(408, ...)``, its buffered part is dropped and the connection closes. Bodies
  being received are counted across connections: one that would take the total past
  ``max_buffered_body_bytes`` gets ``errors(503, ...)`` and a close. (A client that stops
  mid-body would otherwise hold up to ``max_body_bytes`` of memory each, for ever.)
- ``CONNECT`` and ``Upgrade`` requests get ``errors(405/400, ...)`` and a close: the router
  is no tunnel, and the bytes after such a head are not HTTP.
- Malformed HTTP gets ``errors(400, ...)`` and a close; a handler that raises gets
  ``errors(500, ...)``. ``errors`` builds the body (the router's OpenAI error shape).

Must not import other ``router`` modules except ``router.http_messages``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate

import httptools

from router.http_messages import Request, Response, StreamResponse, head_bytes

__all__ = ["ErrorBody", "Handler", "HttpServer"]
log = logging.getLogger("kvrouter.http")

_MAX_HEAD_BYTES = 64 * 1024
_LINGER_S = 2.0
_MAX_PIPELINED = 32
_NO_BODY_STATUSES = frozenset({204, 304})
_TRIM_AFTER_BYTES = 16 << 20


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _libc_malloc_trim()

Handler = Callable[[Request], Awaitable[Response | StreamResponse]]
ErrorBody = Callable[[int, str, Request | None], Response]
"""(status, message, the request when there is one) -> the error answer."""


class HttpServer:
    """Listens on host:port and serves every request through ``handler``."""

    def __init__(self, handler: Handler, errors: ErrorBody, *, max_body_bytes: int,
                 keepalive_timeout_s: float = 75.0, body_timeout_s: float = 60.0,
                 max_buffered_body_bytes: int = 0,
                 access_log: logging.Logger | None = None) -> None:
        self.handler = handler
        self.errors = errors
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_buffered_body_bytes = max_buffered_body_bytes
        """Bound on the bytes of request bodies being received, over all connections
        (0: none)."""
        self.buffered_body_bytes = 0
        self.dropped_body_bytes = 0
        """Bytes of refused bodies freed since memory was last handed back to the system."""
        self.access_log = access_log
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._date = b""
        self._date_s = 0

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                reuse_address=True)
        self._sweeper = loop.create_task(self._sweep_idle(), name="kvrouter-http-idle")
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep_idle(self) -> None:
        # One periodic sweep instead of a timer armed and cancelled around every request.
        period_s = min(self.keepalive_timeout_s / 2, self.body_timeout_s / 2, 5.0)
        while True:
            await asyncio.sleep(period_s)
            now_s = time.monotonic()
            limit_s = now_s - self.keepalive_timeout_s
            body_limit_s = now_s - self.body_timeout_s
            for conn in list(self.connections):
                if conn.idle_since is not None and conn.idle_since < limit_s:
                    conn.close_when_idle()
                elif conn.body_since is not None and conn.body_since < body_limit_s:
                    conn.body_timed_out()
            if self.dropped_body_bytes > _TRIM_AFTER_BYTES:
                # glibc keeps freed chunks of large bodies in its heap, so RSS would stay at
                # an attack's peak; hand them back (off the request path, once per sweep).
                self.dropped_body_bytes = 0
                if _malloc_trim is not None:
                    _malloc_trim(0)

    async def close(self, grace_s: float = 60.0) -> None:
        """Stop accepting, close idle connections, give in-flight requests ``grace_s`` to
        finish, then cancel them and close every connection."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = time.monotonic() + grace_s
        # Polled, not signalled: shutdown is rare and this keeps the hot path free of it.
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.abort()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    def date(self) -> bytes:
        now_s = int(time.time())
        if now_s != self._date_s:
            self._date_s = now_s
            self._date = formatdate(now_s, usegmt=True).encode("ascii")
        return self._date


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.task: asyncio.Task[None] | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.closed = False
        self.closing = False
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = True  # the first bytes on a connection are a request head
        self._read_bytes = 0
        self._head_too_large = False
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._request: Request | None = None
        self._discarding = False
        self._body_pending = False  # the head is in, the body not yet
        # Since when a body has been arriving over more than one read (None otherwise).
        self.body_since: float | None = None
        self._paused = False
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        # Since when the connection waits for a request (None while one is in progress).
        self.idle_since: float | None = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.task is not None or bool(self.queue)

    # -- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._release_body(dropped=True)
        self.body_since = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client went away"))
        self.queue.clear()
        if self.task is not None:
            self.task.cancel()  # the client is gone: stop the work done for it

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._read_bytes = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # on_headers_complete refused the request and it waits for its turn; what follows
            # its head is another protocol's bytes: read no more of them.
            self.closing = True
            return
        except httptools.HttpParserError as exc:
            # An exception raised in a parser callback arrives wrapped in this one.
            if self._head_too_large:
                self._fail(431, "request headers are too large")
            else:
                self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head:
            # Counted per read that ends inside a head (not per header callback, and not a
            # read that completes the head, whose rest may be a large body): a head that
            # keeps coming is refused once past the limit, give or take one read.
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_BYTES:
                self._fail(431, "request headers are too large")
        elif self._body_pending and self.body_since is None:
            self.body_since = time.monotonic()  # only bodies spanning reads pay for the clock

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # idle_since stays set until the head is complete: a client that trickles a head
        # is closed by the idle sweep like one that sends nothing.
        self._in_head = True
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._body = []
        self._body_bytes = 0
        self._request = None
        self._discarding = False
        self._body_pending = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.idle_since = None
        # Only a head that could be past the limit is measured exactly (most are a few
        # hundred bytes, and this runs for every request).
        if self._head_bytes + self._read_bytes > _MAX_HEAD_BYTES and _head_size(
                self._url, self._headers) > _MAX_HEAD_BYTES:
            self._head_too_large = True
            raise ValueError("request head too large")
        parser = self.parser
        request = Request(
            self, parser.get_method().decode("ascii"), self._url.decode("latin-1"), self._headers,
            parser.get_http_version(), parser.should_keep_alive())
        self._request = request
        if parser.should_upgrade():
            if request.method == "CONNECT":
                self._refuse(request, 405, "CONNECT is not supported: the router is no tunnel")
            else:
                upgrade = request.headers.get("upgrade", "")
                self._refuse(request, 400, f"protocol upgrades are not supported (Upgrade: "
                                           f"{upgrade[:64]!r})")
            return
        length, expects_continue = _framing(self._headers)
        if length > self.server.max_body_bytes:
            self._too_large(request)
            return
        if expects_continue:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._body_pending = True

    def on_body(self, body: bytes) -> None:
        if self._discarding:
            return
        size = len(body)
        server = self.server
        if self._body_bytes + size > server.max_body_bytes:
            assert self._request is not None
            self._too_large(self._request)
            return
        if server.max_buffered_body_bytes and (
                server.buffered_body_bytes + size > server.max_buffered_body_bytes):
            assert self._request is not None
            self._refuse(self._request, 503, "the router is receiving too many request bodies "
                                             "at once; retry shortly")
            return
        self._body_bytes += size
        server.buffered_body_bytes += size
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._body_pending = False
        self.body_since = None
        request = self._request
        if request is None or self._discarding:
            return
        body = self._body
        request._body = body[0] if len(body) == 1 else b"".join(body)
        self._release_body()
        self._enqueue(request)

    # -- serving ---------------------------------------------------------------------------

    def _too_large(self, request: Request) -> None:
        # Answer now without reading the body, then close: the unread rest of the body must
        # never be parsed as a next request.
        self._discarding = True
        self._release_body(dropped=True)
        request._too_large = True
        request.keep_alive = False
        self._enqueue(request)

    def _refuse(self, request: Request, status: int, message: str) -> None:
        """The server answers this request itself (in its turn) and then closes; the rest of
        its body is discarded."""
        self._discarding = True
        self._body_pending = False
        self.body_since = None
        self._release_body(dropped=True)
        request._refusal = (status, message)
        request.keep_alive = False
        self._enqueue(request)

    def body_timed_out(self) -> None:
        """The sweep found this connection's body arriving for longer than allowed."""
        request = self._request
        if request is None or not self._body_pending:
            self.body_since = None
            return
        self.closing = True  # read nothing more from this client
        self._refuse(request, 408, f"the request body did not arrive within "
                                   f"{self.server.body_timeout_s:g} s")

    def _release_body(self, dropped: bool = False) -> None:
        """The body being received is no longer held here (handed to its request, or
        dropped with the request or the connection)."""
        server = self.server
        server.buffered_body_bytes -= self._body_bytes
        if dropped:
            server.dropped_body_bytes += self._body_bytes
        self._body_bytes = 0
        self._body = []

    def _enqueue(self, request: Request) -> None:
        self.queue.append(request)
        if len(self.queue) >= _MAX_PIPELINED and self.transport is not None:
            self._reading_paused = True  # a client far ahead of us waits in its own buffers
            self.transport.pause_reading()
        if self.task is None:
            self._next()

    def _next(self) -> None:
        request = self.queue.popleft()
        if self._reading_paused and len(self.queue) < _MAX_PIPELINED // 2 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        self.task = self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        started_s = time.monotonic()
        server = self.server
        response: Response | StreamResponse
        try:
            if request._refusal is not None:
                response = server.errors(*request._refusal, request)
                if response.status == 503 and isinstance(response.headers, list):
                    response.headers.append(("Retry-After", "1"))
            else:
                try:
                    response = await server.handler(request)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("unhandled error on %s %s", request.method, request.path)
                    response = server.errors(500, "internal router error", request)
            if self.closed:
                return
            if isinstance(response, StreamResponse):
                if response._conn is None:
                    await response.prepare(request)
                await response.write_eof()
            else:
                self._write_whole(request, response)
            if server.access_log is not None:
                server.access_log.info('%s "%s %s" %d %.1f ms', self._peer(), request.method,
                                       request.raw_path, response.status,
                                       (time.monotonic() - started_s) * 1e3)
        except ConnectionResetError:
            return
        except Exception:
            log.exception("could not write the answer to %s %s", request.method, request.path)
            self.abort()
        finally:
            self.task = None
            if not self.closed:
                self._after(request)

    def _after(self, request: Request) -> None:
        if request._too_large or request._refusal is not None:
            self._linger()
        elif not request.keep_alive or (self.closing and not self.queue):
            self._close_transport()
        elif self.queue:
            self._next()
        else:
            self.idle_since = time.monotonic()

    def _write_whole(self, request: Request, response: Response) -> None:
        body = response.body
        status = response.status
        if status in _NO_BODY_STATUSES:
            extra, body = b"", b""
        else:
            extra = b"Content-Length: %d\r\n" % len(body)
            if request.method == "HEAD":
                body = b""
        if self.closing:
            request.keep_alive = False  # shutting down: tell the client not to reuse this
        head = head_bytes(status, response.headers, extra, request.keep_alive, self.server.date())
        if len(body) < 65536:
            self.write(head + body)
        else:
            assert self.transport is not None
            self.transport.writelines((head, body))

    def _fail(self, status: int, message: str) -> None:
        """Bad HTTP on this connection: answer when nothing is in progress, then close."""
        self.closing = True
        self.queue.clear()
        if self.task is None and self.transport is not None:
            response = self.server.errors(status, message, None)
            self.write(head_bytes(status, response.headers,
                                  b"Content-Length: %d\r\n" % len(response.body), False,
                                  self.server.date()) + response.body)
        self._close_transport()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.transport.write(data)

    def date(self) -> bytes:
        return self.server.date()

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client went away")
        if not self._paused:
            return
        if self._drain is None or self._drain.done():
            self._drain = self.loop.create_future()
        await self._drain

    # -- closing ---------------------------------------------------------------------------

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy:
            self._close_transport()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _linger(self) -> None:
        """Close after an answer sent while the client may still be sending its body: closing
        a socket with unread input makes the kernel reset the connection, which can destroy
        the answer before the client reads it. So: end our side, discard what still comes,
        and close when the client does or after a few seconds."""
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(_LINGER_S, self._close_transport)

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "-"


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """(Content-Length or -1, whether the client expects 100 Continue), in one pass; names
    are compared by length first, so most headers cost one ``len``."""
    length, expects_continue = -1, False
    for name, value in headers:
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = -1  # the parser rejects it
        elif size == 6 and name.lower() == b"expect":
            expects_continue = value.lower() == b"100-continue"
    return length, expects_continue
