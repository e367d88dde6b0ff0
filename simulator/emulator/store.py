"""The emulated pods' fleet-shared KV store on a real Redis/Valkey server (LMCache's remote
backend, a Mooncake store): which blocks it holds lives in the server, so pods in one
emulator process, or in several, share it.

Async; must not import ``router``. No client library: ``RespClient`` speaks RESP2 over a TCP or
Unix socket (``redis://host:port`` or ``unix:///path``), enough for the three commands used.

Layout: one sorted set ``kvrouter:store:<name>`` of engine block hashes (decimal), scored by a
counter bumped on every write: its order is the store's LRU order. ``write(keys)`` runs one
Lua script (atomic in the server, so concurrent writers agree on what is new and what got
evicted): each key is added or refreshed, the least recent ones past ``capacity_blocks`` are
popped, and the script returns (new keys, evicted keys). ``lookup(keys)`` is one ``ZMSCORE``
(Redis >= 6.2 / Valkey): which of them the store holds. The emulator keeps no KV tensors, so
only residency is stored; the load time is the cost profile's ``shared_store_GBps``.

``StoreMirror`` is what the synchronous engine model sees (``simulator.engine.tiers``
``SharedStore`` interface): the pod fills it from ``lookup`` before each step for the requests
submitted since, and drains the engine's write-through into ``write`` after the step, then
publishes the returned stores/evictions as ``locality`` "REMOTE" KV events: the router learns
shared residency from the engines' events, as from LMCache's, and asks the store nothing.
A block another pod's write evicts between a lookup and the step is still "loaded" (a
lookup-to-load race real connectors also have; the next lookup corrects it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlparse

from policies.kv.events import KvEvent
from simulator.engine.tiers import SharedStore

__all__ = ["RedisBlockStore", "RedisServer", "RespClient", "RespError", "StoreMirror"]

_WRITE = """
local cap = tonumber(ARGV[1])
local new = {}
for i = 2, #ARGV do
  local t = redis.call('INCR', KEYS[2])
  if redis.call('ZADD', KEYS[1], t, ARGV[i]) == 1 then new[#new + 1] = ARGV[i] end
end
local evicted = {}
local over = redis.call('ZCARD', KEYS[1]) - cap
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[1], over)
  for i = 1, #popped, 2 do evicted[#evicted + 1] = popped[i] end
end
return {new, evicted}
"""

Reply = int | bytes | str | list["Reply"] | None


class RespError(RuntimeError):
    """The server answered with an error, or the connection broke."""


class RespClient:
    """One connection, one command at a time (a lock keeps replies in order)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme == "unix":
            self._reader, self._writer = await asyncio.open_unix_connection(parsed.path)
        elif parsed.scheme in ("redis", "valkey", "tcp"):
            self._reader, self._writer = await asyncio.open_connection(
                parsed.hostname or "127.0.0.1", parsed.port or 6379)
        else:
            raise ValueError(f"store url {self.url!r}: expected redis://host:port or unix:///path")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()
            self._writer = self._reader = None

    async def command(self, *args: str | int | bytes) -> Reply:
        if self._writer is None or self._reader is None:
            await self.connect()
        assert self._writer is not None and self._reader is not None
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            raw = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        async with self._lock:
            self._writer.write(b"".join(parts))
            await self._writer.drain()
            return await self._read()

    async def _read(self) -> Reply:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise RespError("connection closed by the store")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body.decode()
        if kind == b"-":
            raise RespError(body.decode())
        if kind == b":":
            return int(body)
        if kind == b"$":
            n = int(body)
            if n < 0:
                return None
            data = await self._reader.readexactly(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(body)
            return None if n < 0 else [await self._read() for _ in range(n)]
        raise RespError(f"unexpected reply {line[:20]!r}")


class RedisBlockStore:
    """Block residency of one shared store in a Redis/Valkey server (see the module docstring)."""

    def __init__(self, url: str, capacity_blocks: int, name: str = "default") -> None:
        if capacity_blocks <= 0:
            raise ValueError(f"shared store capacity must be > 0 blocks, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self.client = RespClient(url)
        self._lru = f"kvrouter:store:{name}"
        self._clock = f"kvrouter:store:{name}:clock"
        self._sha: str | None = None

    async def start(self) -> None:
        await self.client.connect()
        sha = await self.client.command("SCRIPT", "LOAD", _WRITE)
        self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)

    async def close(self) -> None:
        await self.client.close()

    async def clear(self) -> None:
        await self.client.command("DEL", self._lru, self._clock)

    async def lookup(self, keys: Sequence[int]) -> list[bool]:
        if not keys:
            return []
        reply = await self.client.command("ZMSCORE", self._lru, *keys)
        if not isinstance(reply, list):
            raise RespError(f"ZMSCORE answered {reply!r}")
        return [score is not None for score in reply]

    async def write(self, keys: Sequence[int]) -> tuple[list[int], list[int]]:
        """Store blocks (chain order); returns (newly stored, evicted) engine hashes."""
        if not keys:
            return [], []
        assert self._sha is not None, "start() first"
        # Deepest first, so a chain's head is the most recent and evicted last.
        reply = await self.client.command("EVALSHA", self._sha, 2, self._lru, self._clock,
                                          self.capacity_blocks, *reversed(keys))
        if not (isinstance(reply, list) and len(reply) == 2
                and isinstance(reply[0], list) and isinstance(reply[1], list)):
            raise RespError(f"store script answered {reply!r}")
        new = [int(k) for k in reply[0] if isinstance(k, bytes)]
        new.reverse()
        return new, [int(k) for k in reply[1] if isinstance(k, bytes)]

    async def size(self) -> int:
        reply = await self.client.command("ZCARD", self._lru)
        return reply if isinstance(reply, int) else 0


class StoreMirror(SharedStore):
    """The engine's synchronous view of a ``RedisBlockStore``: what the last lookups found,
    plus this pod's own writes; the engine's write-through is queued in ``pending``."""

    __slots__ = ("pending",)

    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        super().__init__(capacity_blocks, block_size)
        self.pending: list[int] = []

    def store(self, keys: Sequence[int], events: list[KvEvent]) -> None:
        del events  # the store's answer to the write says what is new: events come from it
        self.pending.extend(keys)
        self._remember(keys)

    def learn(self, keys: Sequence[int], present: Sequence[bool]) -> None:
        held = self._keys
        for key, there in zip(keys, present, strict=True):
            if there:
                held[key] = None
                held.move_to_end(key)
            else:
                held.pop(key, None)

    def forget(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._keys.pop(key, None)

    def _remember(self, keys: Sequence[int]) -> None:
        held = self._keys
        for key in reversed(keys):
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)


class RedisServer:
    """A private ``redis-server`` (or ``valkey-server``) on a Unix socket in a temporary
    directory, no persistence: for an emulator or a test that has no store to point at."""

    def __init__(self, binary: str | None = None) -> None:
        import shutil

        found = binary or shutil.which("redis-server") or shutil.which("valkey-server")
        if found is None:
            raise ValueError("no redis-server or valkey-server on PATH (apt-get install "
                             "redis-server), and no store url given")
        self.binary = found
        self.url = ""
        self._dir: str | None = None
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout_s: float = 10.0) -> str:
        import os
        import tempfile

        self._dir = tempfile.mkdtemp(prefix="kvrouter-store-")
        sock = os.path.join(self._dir, "redis.sock")
        self._proc = await asyncio.create_subprocess_exec(
            self.binary, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly",
            "no", "--dir", self._dir, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        self.url = f"unix://{sock}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                client = RespClient(self.url)
                if await client.command("PING") == "PONG":
                    await client.close()
                    return self.url
            except OSError:
                pass
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise RespError(f"{self.binary} did not start on {sock}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        import shutil

        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
