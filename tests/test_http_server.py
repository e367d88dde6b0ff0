"""The router's client-facing HTTP/1.1 server (``router.http.server``) over raw sockets: the
framing cases real clients produce that the aiohttp-based tests never send (pipelining,
chunked request bodies, ``Expect: 100-continue``, HTTP/1.0, malformed input, oversized bodies
and heads, disconnects). Every case runs on asyncio's loop and on uvloop (``conftest.py``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from router.http.messages import (
    BodyTooLarge,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from router.http.server import HttpServer

MAX_BODY = 1000


class _Handlers:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def handle(self, request: Request) -> Response | StreamResponse:
        if request.path == "/echo":
            try:
                body = await request.read()
            except BodyTooLarge:
                return json_response({"error": "too large"}, status=413)
            return json_response({"method": request.method, "path": request.raw_path,
                                  "body": body.decode(), "x": request.headers.get("X-Test")})
        if request.path == "/stream":
            response = StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(b"data: %d\n\n" % i)
            await response.write_eof()
            return response
        if request.path == "/hang":
            self.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return Response(status=404, body=b"no")


def _error(status: int, message: str, request: Request | None = None) -> Response:
    return json_response({"error": {"message": message, "code": str(status)}}, status=status)


@pytest.fixture
async def served() -> AsyncIterator[tuple[_Handlers, HttpServer, int]]:
    handlers = _Handlers()
    server = HttpServer(handlers.handle, _error, max_body_bytes=MAX_BODY,
                        keepalive_timeout_s=0.5)
    port = await server.start("127.0.0.1", 0)
    yield handlers, server, port
    await server.close(grace_s=0.1)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response, framed by Content-Length or chunked coding."""
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 100:
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    body = b""
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]
    return status, headers, await reader.read()


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_pipelined_requests_answered_in_order_on_one_connection(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"".join(
        b"POST /echo?n=%d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n%d" % (i, i)
        for i in range(5)))
    for i in range(5):
        status, _, body = await _read_response(reader)
        assert status == 200
        assert json.loads(body) == {"method": "POST", "path": f"/echo?n={i}", "body": str(i),
                                    "x": None}
    writer.close()


async def test_chunked_request_body_and_header_lookup(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nX-Test: yes\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, _, body = await _read_response(reader)
    assert status == 200
    assert json.loads(body)["body"] == "hello world"
    assert json.loads(body)["x"] == "yes"
    writer.close()


async def test_expect_100_continue_within_the_limit(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: 3\r\n\r\n")
    status, _, _ = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 100
    writer.write(b"abc")
    status, _, body = await _read_response(reader)
    assert (status, json.loads(body)["body"]) == (200, "abc")
    writer.close()


async def test_oversized_body_by_length_answered_without_reading_it_then_closed(served):
    _, _, port = served
    reader, writer = await _open(port)
    # Expect: 100-continue must not be granted, and the 413 must arrive although the client
    # is still "sending" (it never sends the body at all here).
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    status, headers, body = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 413 and json.loads(body) == {"error": "too large"}
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_oversized_chunked_body_answered_while_the_client_keeps_sending(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 400
    for _ in range(4):  # 1,600 bytes > MAX_BODY; the rest keeps coming after the answer
        writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
    status, headers, _ = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 413 and headers["connection"] == "close"
    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))  # discarded, not parsed
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_malformed_request_gets_json_400_and_close(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"GARBAGE\r\n\r\n")
    status, headers, body = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 400 and json.loads(body)["error"]["code"] == "400"
    assert headers["connection"] == "close"
    writer.close()


async def test_oversized_head_gets_431(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    status, _, _ = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 431
    writer.close()


async def test_http10_stream_is_raw_and_closed(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
    status, headers, body = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 200 and "transfer-encoding" not in headers
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.close()


async def test_http11_stream_is_chunked_and_kept_alive(served):
    _, _, port = served
    reader, writer = await _open(port)
    for _ in range(2):
        writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.close()


async def test_head_request_has_length_but_no_body(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status_line = await reader.readline()
    assert b" 200 " in status_line
    head = b""
    while (line := await reader.readline()) != b"\r\n":
        head += line
    assert b"Content-Length: " in head
    # The next bytes are the second response, not a body of the first.
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_handler_error_is_500_and_connection_survives(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await _read_response(reader)
    assert status == 500 and json.loads(body)["error"]["code"] == "500"
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
    status, _, body = await _read_response(reader)
    assert (status, json.loads(body)["body"]) == (200, "ok")
    writer.close()


async def test_client_disconnect_cancels_the_handler(served):
    handlers, server, port = served
    _reader, writer = await _open(port)
    writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(handlers.started.wait(), 5)
    writer.close()
    await asyncio.wait_for(handlers.cancelled.wait(), 5)
    for _ in range(100):
        if not server.connections:
            break
        await asyncio.sleep(0.01)
    assert not server.connections


async def test_idle_keepalive_connection_is_closed(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = await _read_response(reader)
    assert status == 200
    assert await asyncio.wait_for(reader.read(), 5) == b""  # keepalive_timeout_s is 0.5
    writer.close()


async def test_close_waits_for_in_flight_then_cancels(served):
    handlers, server, port = served
    reader, writer = await _open(port)
    writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(handlers.started.wait(), 5)
    await asyncio.wait_for(server.close(grace_s=0.2), 5)
    assert handlers.cancelled.is_set()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_close_lets_a_running_request_finish_with_connection_close():
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await release.wait()
        return json_response({"done": True})

    server = HttpServer(slow, _error, max_body_bytes=MAX_BODY)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await _open(port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(server.close(grace_s=10))
    await asyncio.sleep(0.1)
    assert not closing.done()  # waits for the running request
    release.set()
    status, headers, body = await asyncio.wait_for(_read_response(reader), 5)
    assert (status, json.loads(body), headers["connection"]) == (200, {"done": True}, "close")
    await asyncio.wait_for(closing, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer listening
    writer.close()


async def test_a_trickled_head_is_closed_like_an_idle_connection(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # never ends the head
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed_by_server = False
    while loop.time() - started < 5:
        # A header line every 0.1 s: never idle that long, but the head never ends.
        try:
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                closed_by_server = True
                break
        except TimeoutError:
            continue
        except ConnectionError:
            closed_by_server = True
            break
    assert closed_by_server
    assert loop.time() - started < 3  # keepalive_timeout_s is 0.5, swept every 0.25 s
    writer.close()


async def test_deep_pipelining_is_answered_in_full(served):
    _, _, port = served
    reader, writer = await _open(port)
    count = 100  # more than the server queues before it stops reading
    writer.write(b"".join(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%d" % (len(str(i)), i)
        for i in range(count)))
    for i in range(count):
        status, _, body = await asyncio.wait_for(_read_response(reader), 5)
        assert (status, json.loads(body)["body"]) == (200, str(i))
    writer.close()


async def test_a_slow_reader_holds_the_stream_back():
    """write() waits while the client reads slower than the handler writes: the server's
    buffer for the connection stays bounded instead of holding the whole stream."""
    chunk = b"x" * 65536
    most_buffered = 0
    written = 0

    async def flood(request: Request) -> StreamResponse:
        nonlocal most_buffered, written
        response = StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        transport = request._conn.transport  # type: ignore[union-attr]
        for _ in range(160):  # 10 MiB
            await response.write(chunk)
            written += len(chunk)
            most_buffered = max(most_buffered, transport.get_write_buffer_size())
        await response.write_eof()
        return response

    server = HttpServer(flood, _error, max_body_bytes=MAX_BODY)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await _open(port)
    writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.3)  # read nothing for a while: the handler must be held back
    assert written < 160 * len(chunk)
    status, _, body = await asyncio.wait_for(_read_response(reader), 30)
    assert status == 200 and len(body) == 160 * len(chunk)
    assert most_buffered < 4 * len(chunk)
    writer.close()
    await server.close(grace_s=1)


async def test_a_large_body_in_the_first_read_is_not_taken_for_a_large_head():
    handlers = _Handlers()
    server = HttpServer(handlers.handle, _error, max_body_bytes=1 << 20)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await _open(port)
    body = b"b" * 200_000  # far more than the 64 KiB head limit, in the same packets
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                 % (len(body), body))
    status, _, answer = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 200 and len(json.loads(answer)["body"]) == len(body)
    writer.close()
    await server.close(grace_s=1)


async def test_an_oversized_head_over_many_reads_gets_431(served):
    _, _, port = served
    reader, writer = await _open(port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
    for i in range(33):  # 33 x ~2 KiB header lines, each its own read: just over 64 KiB
        writer.write(b"X-Part-%d: %b\r\n" % (i, b"a" * 2048))
        await writer.drain()
        await asyncio.sleep(0.005)
    status, _, _ = await asyncio.wait_for(_read_response(reader), 5)
    assert status == 431
    writer.close()


@pytest.mark.parametrize(("head", "status", "words"), [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405, "CONNECT"),
    (b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
     400, "websocket"),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
     b"Content-Length: 2\r\n\r\nhi", 400, "h2c"),
], ids=["connect", "upgrade-websocket", "upgrade-h2c-with-body"])
async def test_connect_and_upgrade_get_an_error_answer_then_close(served, head, status, words):
    _, _, port = served
    reader, writer = await _open(port)
    # Tunnel bytes after the head are not HTTP and must not be parsed as a next request.
    writer.write(head + b"\x16\x03\x01 tunnel bytes, not HTTP")
    got, headers, body = await asyncio.wait_for(_read_response(reader), 5)
    assert got == status and headers["connection"] == "close"
    assert words in json.loads(body)["error"]["message"]
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_stalled_body_gets_408_and_its_memory_back():
    handlers = _Handlers()
    server = HttpServer(handlers.handle, _error, max_body_bytes=1 << 20, body_timeout_s=0.3)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await _open(port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n"
                     + b"a" * 600_000)
        await writer.drain()
        for _ in range(100):  # the body is held while it arrives
            if server.buffered_body_bytes == 600_000:
                break
            await asyncio.sleep(0.01)
        assert server.buffered_body_bytes == 600_000
        status, headers, body = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 408 and headers["connection"] == "close"
        assert "did not arrive within 0.3 s" in json.loads(body)["error"]["message"]
        assert server.buffered_body_bytes == 0
        # The server ends its side at once, and closes even though this client never does.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        for _ in range(100):
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        assert not server.connections
        writer.close()  # the test's own end, now that the server is seen to close without it
        # A body that arrives in time, over several reads, is served.
        reader, writer = await _open(port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"cd")
        status, _, body = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 200 and json.loads(body)["body"] == "abcd"
        assert server.buffered_body_bytes == 0
        writer.close()
    finally:
        await server.close(grace_s=0.1)


async def test_bodies_past_the_global_bound_get_503_and_a_close():
    handlers = _Handlers()
    server = HttpServer(handlers.handle, _error, max_body_bytes=1 << 20,
                        max_buffered_body_bytes=1_000_000)
    port = await server.start("127.0.0.1", 0)
    try:
        first_reader, first = await _open(port)
        first.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 700000\r\n\r\n"
                    + b"a" * 600_000)
        await first.drain()
        for _ in range(100):
            if server.buffered_body_bytes == 600_000:
                break
            await asyncio.sleep(0.01)
        reader, writer = await _open(port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 700000\r\n\r\n"
                     + b"b" * 500_000)
        status, headers, _ = await asyncio.wait_for(_read_response(reader), 5)
        assert status == 503 and headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        writer.close()
        # The first body still completes; afterwards nothing is held.
        first.write(b"a" * 100_000)
        status, _, body = await asyncio.wait_for(_read_response(first_reader), 5)
        assert status == 200 and len(json.loads(body)["body"]) == 700_000
        assert server.buffered_body_bytes == 0
        first.close()
    finally:
        await server.close(grace_s=0.1)
