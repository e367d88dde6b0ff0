"""A lean HTTP/1.1 server for the router's client side: one ``asyncio.Protocol`` per connection.

aiohttp's server machinery (request objects, the dispatcher, middlewares, the payload writer)
cost about a quarter of the router's CPU per proxied request (bench/README.md), and a
router's client side needs little of it: parse a request (``httptools``, the llhttp parser
uvicorn uses, does the framing: Content-Length, chunked bodies, keep-alive rules), hand it
to one handler with its body in memory, and write the handler's answer in one ``write`` or,
for streams, chunk by chunk with flow control. The request and response objects live in
``router.http.messages``.

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

The per-connection protocol is ``router.http.connection``. Must not import other ``router``
modules except ``router.http.connection`` and ``router.http.messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from router.http.connection import ClientConnection, ErrorBody, Handler

__all__ = ["ErrorBody", "Handler", "HttpServer"]

_TRIM_AFTER_BYTES = 16 << 20


def _libc_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _libc_malloc_trim()


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
        self.connections: set[ClientConnection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._date = b""
        self._date_s = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; returns the bound port (``port`` 0 picks a free one). ``reuse_port``: the
        kernel spreads connections over every process listening on it (``serve --workers``)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ClientConnection(self), host, port,
                                                reuse_address=True,
                                                reuse_port=reuse_port or None)
        self._sweeper = loop.create_task(self._sweep_idle(), name="kvrouter-http-idle")
        # asyncio's `sockets` is a list on both loops where typeshed says tuple: read untyped,
        # or a compiled build (kvrouter.native) would check it against the tuple and raise.
        server: Any = self._server
        return int(server.sockets[0].getsockname()[1])

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
