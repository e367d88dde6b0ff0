"""The request and response objects of ``router.http.server``, and how a response head is
written.

The surface mirrors the part of aiohttp's ``web`` API the router's handlers use
(``Request.read``/``headers``/``raw_headers``, ``Response``, ``json_response``,
``StreamResponse.prepare``/``write``/``write_eof``), so handlers read the same. A
``StreamResponse`` writes through the connection that parsed its request (``Request._conn``,
set by the server): ``write`` waits while the client reads slower than the handler writes.

Must not import other ``router`` modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import Any, Protocol

__all__ = [
    "BodyTooLarge",
    "Connection",
    "Headers",
    "Request",
    "RequestHeaders",
    "Response",
    "StreamResponse",
    "head_bytes",
    "json_response",
]



class Connection(Protocol):
    """What a response needs of the connection that parsed its request."""

    closing: bool
    """The server is shutting down: the answer must say ``Connection: close``."""

    def write(self, data: bytes) -> None:
        """Send now; raises ``ConnectionResetError`` once the client has gone."""

    @property
    def writing_paused(self) -> bool:
        """The client reads slower than we write: ``drain`` before writing more."""

    async def drain(self) -> None:
        """Wait while the client reads slower than we write."""

    def date(self) -> bytes:
        """The ``Date`` header value for this second."""


_REASONS = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}

Headers = Mapping[str, str] | Iterable[tuple[str, str]] | bytes | None
"""Response headers: a mapping, (name, value) pairs, or ready lines (``b"name: value\\r\\n"``
each, for headers passed through from a backend without decoding)."""


class BodyTooLarge(Exception):
    """The request body exceeds the server's ``max_body_bytes``; it was not buffered."""


class RequestHeaders(Mapping[str, str]):
    """A request's headers as a read-only, case-insensitive mapping over the raw bytes:
    a lookup scans the few headers a request has, comparing lengths first, and decodes only
    the value asked for (cheaper than building an index for the one or two lookups a
    proxied request makes). Repeated names: the first wins, as in aiohttp; ``items()`` has
    them all."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def _lookup(self, name: str) -> bytes | None:
        key = name.lower().encode("latin-1")
        size = len(key)
        for n, v in self._raw:
            if len(n) == size and n.lower() == key:
                return v
        return None

    def __getitem__(self, name: str) -> str:
        value = self._lookup(name)
        if value is None:
            raise KeyError(name)
        return value.decode("latin-1")

    def get(self, name: str, default: Any = None) -> Any:
        value = self._lookup(name)
        return default if value is None else value.decode("latin-1")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (n.decode("latin-1") for n, _ in self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]
        """Every header in arrival order, repeated names included."""
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw]


class Request:
    """One parsed request. ``raw_path`` is the request target as sent (path and query)."""

    __slots__ = ("_body", "_conn", "_headers", "_refusal", "_too_large", "http_version",
                 "keep_alive", "method", "path", "raw_headers", "raw_path")

    def __init__(self, conn: Connection | None, method: str, raw_path: str,
                 raw_headers: list[tuple[bytes, bytes]], http_version: str,
                 keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.path = raw_path.partition("?")[0]
        self.raw_headers = raw_headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self._headers: RequestHeaders | None = None
        self._body = b""
        self._too_large = False
        # (status, message) when the server answers this request itself instead of the
        # handler (a stalled body, a protocol upgrade, too many bodies buffered at once).
        self._refusal: tuple[int, str] | None = None

    @property
    def headers(self) -> RequestHeaders:
        if self._headers is None:
            self._headers = RequestHeaders(self.raw_headers)
        return self._headers

    async def read(self) -> bytes:
        if self._too_large:
            raise BodyTooLarge
        return self._body

    async def json(self) -> Any:
        return json.loads(await self.read())


class Response:
    """A whole response, written in one go after the handler returns."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, *, status: int = 200, body: bytes = b"", headers: Headers = None,
                 content_type: str | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = _header_list(headers)
        if content_type is not None:
            if isinstance(self.headers, bytes):
                self.headers += b"Content-Type: %b\r\n" % content_type.encode("latin-1")
            else:
                self.headers.append(("Content-Type", content_type))


def json_response(data: Any, *, status: int = 200, headers: Headers = None) -> Response:
    return Response(status=status, body=json.dumps(data).encode(), headers=headers,
                    content_type="application/json")


class StreamResponse:
    """A response written as it is produced: ``prepare`` sends the head, each ``write`` one
    chunk (chunked transfer coding; HTTP/1.0 clients get the raw bytes and a close), and
    ``write_eof`` the end. ``write`` waits while the client reads slower than we write, and
    raises ``ConnectionResetError`` once the client has gone."""

    __slots__ = ("_chunked", "_conn", "_eof", "headers", "status")

    def __init__(self, *, status: int = 200, headers: Headers = None) -> None:
        self.status = status
        self.headers = _header_list(headers)
        self._conn: Connection | None = None
        self._chunked = True
        self._eof = False

    async def prepare(self, request: Request) -> None:
        conn = request._conn
        if conn is None:
            raise RuntimeError("prepare() needs a request the server is serving")
        self._conn = conn
        self._chunked = request.http_version != "1.0"
        if not self._chunked or conn.closing:
            request.keep_alive = False
        extra = b"Transfer-Encoding: chunked\r\n" if self._chunked else b""
        conn.write(head_bytes(self.status, self.headers, extra, request.keep_alive,
                              conn.date()))
        await conn.drain()

    async def write(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None, "write() before prepare()"
        if not data:
            return  # an empty chunk would end a chunked body
        if self._chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            conn.write(data)
        await conn.drain()

    def write_nowait(self, data: bytes, end: bool = False) -> bool:
        """Send ``data`` now (and with ``end`` the end of the body) without waiting for the
        client: for a relay that calls from a protocol callback. Returns False while the
        client reads slower than we write (await ``drain`` before the next write); raises
        ``ConnectionResetError`` once the client has gone."""
        conn = self._conn
        assert conn is not None, "write_nowait() before prepare()"
        if self._eof:
            return True
        if self._chunked:
            out = b"%x\r\n%b\r\n" % (len(data), data) if data else b""
            if end:
                out += b"0\r\n\r\n"  # the last piece and the end leave in one send
        else:
            out = data
        if end:
            self._eof = True
        if out:
            conn.write(out)
        return not conn.writing_paused

    async def drain(self) -> None:
        """Wait while the client reads slower than we write."""
        conn = self._conn
        assert conn is not None, "drain() before prepare()"
        await conn.drain()

    async def write_eof(self) -> None:
        conn = self._conn
        assert conn is not None, "write_eof() before prepare()"
        if self._eof:
            return
        self._eof = True
        if self._chunked:
            conn.write(b"0\r\n\r\n")
        await conn.drain()


def _header_list(headers: Headers) -> list[tuple[str, str]] | bytes:
    if headers is None:
        return []
    if isinstance(headers, bytes):
        return headers
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def head_bytes(status: int, headers: list[tuple[str, str]] | bytes, extra: bytes,
               keep_alive: bool, date: bytes = b"") -> bytes:
    """The status line and header block; ``extra`` holds the framing lines."""
    if isinstance(headers, bytes):
        block = headers  # lines from a backend's head: router.http.client refused stray CR/LF
    else:
        text = "".join([f"{name}: {value}\r\n" for name, value in headers])
        if text.count("\n") != len(headers) or text.count("\r") != len(headers):
            raise ValueError("a response header contains a line break")
        block = text.encode("latin-1")
    reason = _REASONS.get(status, b"Unknown")
    return b"".join((
        b"HTTP/1.1 %d %b\r\n" % (status, reason),
        block,
        extra,
        b"Date: %b\r\n" % date if date else b"",
        b"" if keep_alive else b"Connection: close\r\n",
        b"\r\n",
    ))
