"""One client connection of ``router.http.server``: an ``asyncio.Protocol`` that parses
requests with ``httptools``, queues pipelined ones, serves them in order through the server's
handler and writes the answers (whole, or streamed with flow control).

It enforces, per connection, what ``router.http.server`` describes: the head size limit, the
body limit (``BodyTooLarge``), the body deadline (408) and the share of the server-wide bound
on bodies being received (503), the refusal of ``CONNECT``/``Upgrade``, and the linger after
answering a request whose body is not read.

Must not import other ``router`` modules except ``router.http.messages``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import httptools

from router.http.messages import Request, Response, StreamResponse, head_bytes

__all__ = ["ClientConnection", "ErrorBody", "Handler", "ServerSide"]
log = logging.getLogger("kvrouter.http")

_MAX_HEAD_BYTES = 64 * 1024
_LINGER_S = 2.0
_MAX_PIPELINED = 32
_NO_BODY_STATUSES = frozenset({204, 304})

Handler = Callable[[Request], Awaitable[Response | StreamResponse]]
ErrorBody = Callable[[int, str, Request | None], Response]
"""(status, message, the request when there is one) -> the error answer."""


class ServerSide(Protocol):
    """What a connection reads and updates on its server (``router.http.server.HttpServer``)."""

    handler: Handler
    errors: ErrorBody
    max_body_bytes: int
    body_timeout_s: float
    max_buffered_body_bytes: int
    buffered_body_bytes: int
    dropped_body_bytes: int
    access_log: logging.Logger | None
    connections: set[ClientConnection]

    def date(self) -> bytes: ...


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ServerSide) -> None:
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

    @property
    def writing_paused(self) -> bool:
        return self._paused

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
