"""The proxy's lean HTTP/1.1 client against raw servers that send crafted bytes on real
sockets: framing (length, chunked split anywhere, until close), interim responses, keep-alive
reuse and the stale-connection resend, timeouts and broken bodies."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.http.client import ConnectFailed, HeadTimeout, HttpClient, ResponseBroken


class RawServer:
    """Answers each request with the next canned reply, written in the given pieces."""

    def __init__(self, replies: list[list[bytes]], close_after: bool = False,
                 delay_s: float = 0.0) -> None:
        self.replies = replies
        self.close_after = close_after
        self.delay_s = delay_s
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                await asyncio.sleep(self.delay_s)
                for piece in self.replies.pop(0):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def client(**kw: float) -> HttpClient:
    return HttpClient(kw.get("connect", 5.0), kw.get("first_byte", 10.0), kw.get("idle", 10.0))


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
           b"\r\n7\r\ndata: a\r\n9;ext=1\r\ndata: bcd\r\n0\r\nX-Trailer: 1\r\n\r\n")

FRAMINGS = [
    ("length-one-piece", [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], b"hello", True),
    ("length-split", [b"HTTP/1.1 200 OK\r\nConte", b"nt-Length: 5\r\n\r\nhe", b"llo"], b"hello",
     True),
    ("chunked-one-piece", [CHUNKED], b"data: adata: bcd", True),
    ("chunked-byte-by-byte", [CHUNKED[i:i + 1] for i in range(len(CHUNKED))],
     b"data: adata: bcd", True),
    ("until-close", [b"HTTP/1.0 200 OK\r\n\r\nold ", b"style"], b"old style", False),
    ("interim-100", [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2"
                     b"\r\n\r\nok"], b"ok", True),
    ("no-content", [b"HTTP/1.1 204 No Content\r\n\r\n"], b"", True),
]


@pytest.mark.parametrize(("pieces", "body", "reusable"), [f[1:] for f in FRAMINGS],
                         ids=[f[0] for f in FRAMINGS])
async def test_framings(pieces, body, reusable):
    server = RawServer([pieces, [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"]],
                       close_after=not reusable)
    async with server as url:
        http = client()
        response = await http.request(url, "POST", b"/v1/x?q=1", [(b"X-A", b"1")], b"{}")
        assert await response.read() == body
        response.release()
        assert server.requests[0].startswith(b"POST /v1/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"X-A: 1\r\n" in server.requests[0] and server.requests[0].endswith(b"\r\n\r\n{}")
        if reusable:  # the second request goes over the same connection
            second = await http.request(url, "POST", b"/", [], b"")
            assert (second.status, await second.read()) == (200, b"hi")
            second.release()
            assert server.connections == 1
        http.close()


async def test_stale_keep_alive_connection_is_resent_once():
    server = RawServer([[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"],
                        [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"]], close_after=True)
    async with server as url:
        http = client()
        first = await http.request(url, "POST", b"/", [], b"1")
        assert await first.read() == b"a"
        first.release()  # kept: the head did not say close, but the server closes after it
        await asyncio.sleep(0.1)
        second = await http.request(url, "POST", b"/", [], b"2")
        assert await second.read() == b"b"
        second.release()
        assert server.connections == 2
        http.close()


async def test_head_timeout_and_connect_failure():
    server = RawServer([[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]], delay_s=5)
    async with server as url:
        http = client(first_byte=0.2)
        with pytest.raises(HeadTimeout):
            await http.request(url, "POST", b"/", [], b"")
        http.close()
    http = client(connect=1.0)
    with pytest.raises(ConnectFailed):
        await http.request(url, "POST", b"/", [], b"")


@pytest.mark.parametrize(
    "pieces",
    [[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
     [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"],
     [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
     [b"SPDY/3 200 OK\r\n\r\n"],
     [b"HTTP/1.1 200 OK\r\nX-A: 1\nX-Injected: 2\r\nContent-Length: 0\r\n\r\n"],
     [b"HTTP/1.1 200 OK\r\nX-A: 1\rX-Injected: 2\r\nContent-Length: 0\r\n\r\n"]],
    ids=["length-cut", "chunked-cut", "bad-chunk-size", "not-http1", "bare-lf", "bare-cr"],
)
async def test_broken_bodies_raise(pieces):
    async with RawServer([pieces], close_after=True) as url:
        http = client()
        with pytest.raises(ResponseBroken):
            response = await http.request(url, "POST", b"/", [], b"")
            await response.read()
        http.close()


async def test_idle_timeout_mid_body_and_chunks_arrive_as_sent():
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n"]
    async with RawServer([pieces, [b""]]) as url:  # then silence, the connection open
        http = client(idle=0.3)
        response = await http.request(url, "GET", b"/", [], b"")
        assert await response.read_chunk() == b"one"
        with pytest.raises(ResponseBroken, match="no data"):
            await response.read_chunk()
        response.release()
        http.close()


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), min_size=0, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=2000), max_size=6),
)
def test_chunked_bodies_survive_any_split(chunks, cuts):
    """Any chunk payloads (CRLFs inside included), cut into pieces anywhere, come out whole."""
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    pieces, start = [], 0
    for cut in sorted(set(cuts)):
        if start < cut < len(wire):
            pieces.append(wire[start:cut])
            start = cut
    pieces.append(wire[start:])

    async def run() -> tuple[bytes, list[tuple[bytes, bool]]]:
        async with RawServer([pieces, pieces]) as url:
            http = client()
            response = await http.request(url, "GET", b"/", [], b"")
            body = await response.read()
            response.release()
            # The same body relayed: the same bytes, and the end handed over exactly once.
            relayed = await http.request(url, "GET", b"/", [], b"")
            sink = Sink()
            await relayed.relay(sink, sink.drain)
            relayed.release()
            http.close()
            return body, sink.pieces

    body, relayed = asyncio.run(run())
    assert body == b"".join(chunks)
    assert b"".join(data for data, _ in relayed) == body
    assert [end for _, end in relayed] == [False] * (len(relayed) - 1) + [True]


async def test_max_connections_caps_open_connections_and_queues_the_rest():
    """Four concurrent requests through a client limited to two connections: the backend
    never sees more than two at once, every request completes, and a finished connection's
    slot goes to a waiting request."""
    open_now = 0
    most_open = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most_open
        open_now += 1
        most_open = max(most_open, open_now)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(0.1)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            open_now -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    http = HttpClient(5.0, 10.0, 10.0, max_connections=2)

    async def one() -> bytes:
        response = await http.request(url, "GET", b"/", [], b"")
        body = await response.read()
        response.release()
        return body

    try:
        assert await asyncio.gather(*(one() for _ in range(4))) == [b"ok"] * 4
        assert most_open == 2
        assert http.open_connections <= 2
    finally:
        http.close()
        server.close()


async def test_max_connections_wait_ends_with_connect_failed():
    async with RawServer([[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]], delay_s=1.0) as url:
        http = HttpClient(0.2, 10.0, 10.0, max_connections=1)
        first = asyncio.create_task(http.request(url, "GET", b"/", [], b""))
        await asyncio.sleep(0.05)  # the first holds the only connection for ~1 s
        with pytest.raises(ConnectFailed, match="max_connections"):
            await http.request(url, "GET", b"/", [], b"")
        (await first).release()
        http.close()
        assert http.open_connections == 0  # every slot came back


async def test_preconnect_opens_idle_connections_that_requests_then_reuse():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer([[ok], [ok], [ok]]) as url:
        http = HttpClient(5.0, 10.0, 10.0, max_connections=5)
        try:
            assert await http.preconnect(url, 3) == 3
            assert await http.preconnect(url, 3) == 0  # topped up already
            assert http.open_connections == 3
            # Three concurrent requests find a connection each: the server accepts no more.
            responses = await asyncio.gather(
                *(http.request(url, "GET", b"/", [], b"") for _ in range(3)))
            assert [await r.read() for r in responses] == [b"ok"] * 3
            for r in responses:
                r.release()
            assert http.open_connections == 3
        finally:
            http.close()


async def test_preconnect_counts_the_servers_accepts_and_respects_the_connection_limit():
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    http = HttpClient(5.0, 10.0, 10.0, max_connections=2)
    try:
        assert await http.preconnect(url, 4) == 2  # never past upstream.max_connections
        await asyncio.sleep(0.05)
        assert accepted == 2
        response = await http.request(url, "GET", b"/", [], b"")
        assert await response.read() == b"ok"
        response.release()
        assert accepted == 2  # the request went out on a pre-opened connection
    finally:
        http.close()
        server.close()
    # A backend that refuses: nothing opened, no slot kept, no error for the caller.
    refused = HttpClient(0.5, 10.0, 10.0, max_connections=2)
    assert await refused.preconnect(url, 2) == 0
    assert refused.open_connections == 0


async def test_preconnect_racing_close_leaves_nothing_open():
    """The health checker's top-up may still be connecting when the app stops and closes the
    client: that connection is closed, not parked in a pool nobody will close."""
    open_now = 0
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now
        open_now += 1
        try:
            await reader.read()  # until the client closes
        finally:
            open_now -= 1
            writer.close()
            closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    http = HttpClient(5.0, 10.0, 10.0)
    try:
        warming = asyncio.create_task(http.preconnect(url, 2))
        await asyncio.sleep(0)  # it has started connecting
        http.close()
        assert await warming <= 1
        await asyncio.wait_for(closed.wait(), 2.0)
        await asyncio.sleep(0.05)
        assert open_now == 0 and http.open_connections == 0
    finally:
        server.close()


class ThreadServer:
    """A blocking keep-alive server on its own thread: it receives bytes while the event loop
    is held, so a test can tell, from inside a callback, what was already on the wire."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.got_request = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            self.accepted.set()
            with conn:
                buf = b""
                while data := conn.recv(65536):
                    buf += data
                    while b"\r\n\r\n" in buf:  # bodies are empty in these tests
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        self.got_request.set()
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5.0)  # ends once the client has closed its connection


async def test_sent_runs_after_the_bytes_leave_on_a_kept_alive_connection():
    server = ThreadServer()
    c = client()
    try:
        first = await c.request(server.url, "GET", b"/a", [], b"")
        await first.read()
        first.release()  # back to the pool: the next request has a connection at hand
        server.got_request.clear()
        seen = []
        # The loop is held inside the callback: the server thread sees the request only if
        # its bytes were written before the callback ran.
        second = await c.request(server.url, "GET", b"/b", [], b"",
                                 sent=lambda: seen.append(server.got_request.wait(2.0)))
        assert await second.read() == b"ok"
        second.release()
        assert seen == [True]
    finally:
        c.close()
        server.close()


async def test_sent_runs_before_connecting_without_a_connection_at_hand():
    server = ThreadServer()
    c = client()
    try:
        seen = []
        response = await c.request(server.url, "GET", b"/a", [], b"",
                                   sent=lambda: seen.append(server.accepted.wait(0.3)))
        assert await response.read() == b"ok"
        response.release()
        assert seen == [False]  # called before the connection was even accepted
    finally:
        c.close()
        server.close()


async def test_sent_runs_once_even_when_the_request_fails():
    calls = []
    c = client(connect=1.0)
    with pytest.raises(ConnectFailed):
        await c.request("http://127.0.0.1:9", "GET", b"/", [], b"",
                        sent=lambda: calls.append(1))
    assert calls == [1]
    c.close()


# -- relay: the body handed to a sink from the socket callback --------------------------------

class Sink:
    """Records what a relay hands over; ``full_after`` pieces, it says its receiver is full
    until ``drain`` is awaited."""

    def __init__(self, full_after: int = -1, fail_after: int = -1) -> None:
        self.pieces: list[tuple[bytes, bool]] = []
        self.full_after = full_after
        self.fail_after = fail_after
        self.drains = 0
        self.release = asyncio.Event()

    def __call__(self, data: bytes, end: bool) -> bool:
        if len(self.pieces) == self.fail_after:
            raise ConnectionResetError("the client went away")
        self.pieces.append((data, end))
        return len(self.pieces) != self.full_after

    async def drain(self) -> None:
        self.drains += 1
        await self.release.wait()

    @property
    def body(self) -> bytes:
        return b"".join(data for data, _ in self.pieces)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_relay_hands_each_read_over_as_it_arrives_and_the_end_once():
    pieces = [SSE_HEAD + _chunk(b"first")] + [_chunk(b"tok%d" % i) for i in range(5)] + [
        _chunk(b"[DONE]") + b"0\r\n\r\n"]
    async with RawServer([pieces, [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"]]) as url:
        http = client()
        response = await http.request(url, "POST", b"/", [], b"")
        assert await response.read_chunk() == b"first"
        sink = Sink()
        sink.release.set()
        await response.relay(sink, sink.drain)
        # The server wrote each piece 10 ms apart: each came in its own read, the last one
        # together with the body's end.
        assert sink.pieces == [(b"tok%d" % i, False) for i in range(5)] + [(b"[DONE]", True)]
        response.release()
        second = await http.request(url, "POST", b"/", [], b"")  # the connection is reused
        assert await second.read() == b"hi"
        second.release()
        http.close()


async def test_relay_end_alone_and_a_body_already_complete():
    pieces = [SSE_HEAD + _chunk(b"a"), _chunk(b"b"), b"0\r\n\r\n"]
    async with RawServer([pieces, [SSE_HEAD + _chunk(b"x") + _chunk(b"y") + b"0\r\n\r\n"]]) as url:
        http = client()
        response = await http.request(url, "POST", b"/", [], b"")
        assert await response.read_chunk() == b"a"
        sink = Sink()
        await response.relay(sink, sink.drain)
        assert sink.pieces == [(b"b", False), (b"", True)]  # the end came in a read of its own
        response.release()
        second = await http.request(url, "POST", b"/", [], b"")
        await asyncio.sleep(0.05)  # everything arrived before the relay starts
        sink = Sink()
        await second.relay(sink, sink.drain)
        assert sink.pieces == [(b"xy", True)]
        second.release()
        http.close()


async def test_relay_stops_reading_while_the_receiver_is_full():
    pieces = [SSE_HEAD] + [_chunk(b"p%d" % i) for i in range(6)] + [b"0\r\n\r\n"]
    async with RawServer([pieces]) as url:
        http = client()
        response = await http.request(url, "POST", b"/", [], b"")
        sink = Sink(full_after=2)
        relay = asyncio.ensure_future(response.relay(sink, sink.drain))
        await asyncio.sleep(0.3)  # the server has written everything by now
        assert sink.drains == 1 and len(sink.pieces) == 2  # nothing more until it drains
        sink.release.set()
        await relay
        assert sink.body == b"".join(b"p%d" % i for i in range(6))
        assert sink.pieces[-1][1] is True
        response.release()
        http.close()


async def test_relay_idle_timeout_counts_from_the_last_data():
    # Data every 10 ms for ~0.6 s with an idle timeout of 0.3 s: never idle that long. Then
    # silence: the relay fails after the idle timeout, having handed over everything before.
    pieces = [SSE_HEAD] + [_chunk(b"t")] * 60
    async with RawServer([pieces, [b""]]) as url:
        http = client(idle=0.3)
        response = await http.request(url, "POST", b"/", [], b"")
        sink = Sink()
        with pytest.raises(ResponseBroken, match="no data"):
            await response.relay(sink, sink.drain)
        assert sink.body == b"t" * 60
        response.release()
        http.close()


async def test_relay_raises_what_the_sink_raised_and_a_break_after_what_arrived():
    pieces = [SSE_HEAD, _chunk(b"a"), _chunk(b"b"), _chunk(b"c"), b"0\r\n\r\n"]
    async with RawServer([pieces]) as url:
        http = client()
        response = await http.request(url, "POST", b"/", [], b"")
        sink = Sink(fail_after=1)
        with pytest.raises(ConnectionResetError):
            await response.relay(sink, sink.drain)
        assert sink.body == b"a"
        response.close()
        http.close()
    async with RawServer([[SSE_HEAD, _chunk(b"a"), _chunk(b"b")]], close_after=True) as url:
        http = client()
        response = await http.request(url, "POST", b"/", [], b"")
        sink = Sink()
        with pytest.raises(ResponseBroken, match="closed the connection"):
            await response.relay(sink, sink.drain)
        assert sink.body == b"ab"
        http.close()


async def test_relay_of_a_body_that_ends_when_the_backend_closes():
    pieces = [b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\nold ", b"style"]
    async with RawServer([pieces], close_after=True) as url:
        http = client()
        response = await http.request(url, "POST", b"/", [], b"")
        sink = Sink()
        await response.relay(sink, sink.drain)
        assert sink.body == b"old style"
        assert [end for _, end in sink.pieces][-1] is True
        assert sum(end for _, end in sink.pieces) == 1
        response.release()  # not reusable: it ended with the connection
        http.close()
