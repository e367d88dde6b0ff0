"""Replica sync over Unix stream sockets (``router.sync.unix``, ``serve --workers``): real
sockets in a temporary directory. Frames arrive whole and in order however the stream splits
them; a receiver that stops reading costs the sender at most its buffer, then frames to it
are dropped and counted; an impossible frame length closes that connection; a stale socket
file is taken over and a live one is not."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_backend import wait_for

from router.sync.unix import MAX_FRAME_BYTES, UnixLink


@pytest.fixture
def sock_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for the test's sockets. A Unix socket path is limited to ~107 bytes and
    pytest's tmp_path can be longer: then a fresh short directory stands in."""
    if len(str(tmp_path)) < 80:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="kvr-", dir="/tmp"))
    try:
        yield short
    finally:
        shutil.rmtree(short, ignore_errors=True)


async def test_frames_reach_a_connected_sibling_whole_and_in_order(sock_dir: Path) -> None:
    base = sock_dir
    got: list[bytes] = []
    a = UnixLink(str(base / "a.sock"), lambda frames: None)
    b = UnixLink(str(base / "b.sock"), got.extend)
    await a.start()
    await b.start()
    try:
        assert await b.connect(f"unix://{a.path}")
        assert b.connected() == {f"unix://{a.path}"}
        await wait_for(lambda: len(a._senders) == 1, "A accepts B")
        # Sizes around the 4-byte header, and a 3 MB frame the kernel delivers in pieces.
        sent = [b"", b"x", b"abcd", bytes(range(256)) * 40, b"y" * 3_000_000]
        for i, frame in enumerate(sent):
            assert a.send([frame, str(i).encode()]) == 0
        expected = [f for i, frame in enumerate(sent) for f in (frame, str(i).encode())]
        await wait_for(lambda: len(got) == len(expected), "every frame")
        assert got == expected
    finally:
        await a.close()
        await b.close()
    assert not (base / "a.sock").exists()


async def test_a_stream_split_anywhere_still_yields_whole_frames(sock_dir: Path) -> None:
    base = sock_dir
    frames = [b"first", b"", b"third frame"]
    wire = b"".join(len(f).to_bytes(4, "big") + f for f in frames)

    closed: list[bool] = []

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for i in range(len(wire)):  # one byte per write: every split point is exercised
                writer.write(wire[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)
            await reader.read()  # until the link closes
        finally:
            writer.close()
            closed.append(True)

    server = await asyncio.start_unix_server(dribble, str(base / "peer.sock"))
    got: list[bytes] = []
    link = UnixLink(str(base / "own.sock"), got.extend)
    try:
        assert await link.connect(f"unix://{base / 'peer.sock'}")
        await wait_for(lambda: len(got) == 3, "three frames")
        assert got == frames
    finally:
        await link.close()
        await wait_for(lambda: len(closed) == 1, "the peer's side closed")
        server.close()


async def test_an_impossible_frame_length_closes_that_connection(sock_dir: Path) -> None:
    base = sock_dir

    closed: list[bool] = []

    async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write((MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"junk")
            await writer.drain()
            await reader.read()
        except ConnectionError:
            pass  # the link aborted it: the point of the test
        finally:
            writer.close()
            closed.append(True)

    server = await asyncio.start_unix_server(liar, str(base / "liar.sock"))
    got: list[bytes] = []
    counted: list[bool] = []
    link = UnixLink(str(base / "own.sock"), got.extend, on_bad_frame=lambda: counted.append(True))
    try:
        endpoint = f"unix://{base / 'liar.sock'}"
        assert await link.connect(endpoint)
        await wait_for(lambda: counted == [True] and not link.connected(),
                       "the connection closed")
        assert got == [] and counted == [True]
        assert await link.connect(endpoint)  # the next discovery round reconnects
    finally:
        await link.close()
        await wait_for(lambda: len(closed) == 2, "the liar's side closed")
        server.close()


async def test_a_receiver_that_stops_reading_misses_frames_instead_of_growing_memory(
    sock_dir: Path,
) -> None:
    base = sock_dir
    link = UnixLink(str(base / "a.sock"), lambda frames: None, max_buffered_bytes=1 << 20)
    await link.start()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # connects, never reads
    try:
        stuck.connect(link.path)
        await wait_for(lambda: len(link._senders) == 1, "the connection accepted")
        frame = b"z" * 65_536
        missed = [link.send([frame]) for _ in range(200)]  # 13 MB against a 1 MiB allowance
        assert missed[0] == 0
        assert missed[-1] == 1
        (sender,) = link._senders
        assert sender.transport is not None
        # Bounded by the allowance plus one frame, not by what was sent.
        assert sender.transport.get_write_buffer_size() <= (1 << 20) + len(frame) + 4
    finally:
        stuck.close()
        await link.close()


async def test_connect_to_nothing_is_false_and_retried_later(sock_dir: Path) -> None:
    base = sock_dir
    got: list[bytes] = []
    b = UnixLink(str(base / "b.sock"), got.extend)
    endpoint = f"unix://{base / 'a.sock'}"
    assert not await b.connect(endpoint)
    assert b.connected() == frozenset()
    a = UnixLink(str(base / "a.sock"), lambda frames: None)
    await a.start()
    try:
        assert await b.connect(endpoint)
        await wait_for(lambda: len(a._senders) == 1, "A accepts B")
        a.send([b"late"])
        await wait_for(lambda: got == [b"late"], "the frame")
        await a.close()  # A goes away: B forgets the connection, to reconnect on discovery
        await wait_for(lambda: not b.connected(), "B notices")
    finally:
        await a.close()
        await b.close()


async def test_a_stale_socket_file_is_taken_over_and_a_live_one_is_not(sock_dir: Path) -> None:
    base = sock_dir
    path = base / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a file left by a killed replica: bound, nobody listening
    stale.close()
    first = UnixLink(str(path), lambda frames: None)
    await first.start()
    try:
        second = UnixLink(str(path), lambda frames: None)
        with pytest.raises(OSError, match="another process listens"):
            await second.start()
    finally:
        await first.close()
