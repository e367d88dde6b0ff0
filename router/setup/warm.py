"""Warm start: a replica serves its index snapshot to siblings, and a new replica loads one
before it reports ready (``sync.warm_start``, ``router.config.sync.WarmStartConfig``).

Serving: ``GET /admin/index/snapshot`` with ``Authorization: Bearer <server.admin_token>``
(401 without it; 403 when no token is configured: the index tells which prompts the fleet
has seen). The answer is ``application/x-msgpack`` (``router.kv.snapshot``): the event-fed
index and every stream's position, cut in one synchronous step on the event loop (the only
place the index and the streams change, so the two agree; ``policies.kv.snapshot.cut`` copies
dicts at C speed), then built and encoded in a worker thread.
A replica still warming answers 503: a half-warm image would spread.

Loading (``fetch`` then ``load``, in the KV task before any event source is added): ask each
sibling in turn (``urls``, else the sync peers' hosts at ``http_port``) until one answers
with a snapshot that is not this replica's own, retrying the list until ``timeout_s``. Its
blocks go into the index, its stream positions to the ingestor, which replays each engine
from there instead of from 0. ``not_ready`` keeps ``/ready`` at 503 until the snapshot is
loaded and every restored stream has replayed (or ``catch_up_timeout_s`` passed). No sibling
in time: one log line, ``kvrouter_kv_warm_starts_total{outcome="cold"}``, and a cold start
as without warm start. Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

import aiohttp

from policies.kv import snapshot as image
from policies.kv.index import PrefixIndex
from router.config import Config
from router.errors import http_error, require_admin
from router.http.messages import Request, Response
from router.kv.events import KvEventIngestor
from router.kv.metrics import KvMetrics
from router.kv.snapshot import Snapshot, SnapshotError, decode, encode
from router.sync.peers import PeerFinder, endpoint_host, kube_config

__all__ = ["SNAPSHOT_PATH", "WarmStart"]

log = logging.getLogger("kvrouter.warm_start")

SNAPSHOT_PATH = "/admin/index/snapshot"
_RETRY_S = 0.5


class WarmStart:
    def __init__(self, config: Config, index: PrefixIndex, metrics: KvMetrics,
                 environ: Mapping[str, str]) -> None:
        self.section = config.sync.warm_start
        self.sync = config.sync
        self.token = config.server.admin_token
        self.http_port = self.section.http_port or config.server.port
        self.index = index
        self.metrics = metrics
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self._kube = kube_config(config.sync, environ) if self.section.enabled and \
            not self.section.urls else None
        self.ingestor: KvEventIngestor | None = None
        self.phase = "fetching" if self.section.enabled else "done"
        self._catch_up_deadline_s = float("inf")

    # ---- serving ------------------------------------------------------------------------------

    async def take(self) -> bytes:
        """The encoded snapshot. The cut (dict copies) and the stream positions are taken in
        one go, with no await between them; the image is built and encoded from the copies
        in a worker thread, so routing goes on meanwhile."""
        positions = self.ingestor.positions() if self.ingestor is not None else ()
        cut, taken_at_s = image.cut(self.index), time.time()
        return await asyncio.to_thread(
            lambda: encode(Snapshot(self.replica, taken_at_s, image.image_of(cut), positions)))

    async def serve(self, request: Request) -> Response:
        require_admin(request, self.token, SNAPSHOT_PATH, open_without=False)
        if self.not_ready() is not None:
            raise http_error(503, "this replica is warming up itself; ask a sibling that is "
                             "ready")
        body = await self.take()
        self.metrics.snapshots_served.inc()
        return Response(body=body, content_type="application/x-msgpack")

    # ---- loading ------------------------------------------------------------------------------

    def not_ready(self) -> str | None:
        if self.phase == "fetching":
            return "warming up: fetching a sibling's index snapshot"
        if self.phase == "catching_up":
            behind = self.ingestor.catching_up() if self.ingestor is not None else 0
            if behind and time.monotonic() < self._catch_up_deadline_s:
                return f"warming up: {behind} KV event streams replaying from the snapshot"
            if behind:
                log.warning("warm start: %d streams still replaying after %.0fs; ready anyway",
                            behind, self.section.catch_up_timeout_s)
            self.phase = "done"
        return None

    async def siblings(self) -> list[str]:
        if self.section.urls:
            return [u.rstrip("/") for u in self.section.urls]
        found = await PeerFinder(self.sync, self._kube).find()
        hosts = sorted({h for e in found if (h := endpoint_host(e)) is not None})
        return [f"http://[{h}]:{self.http_port}" if ":" in h else f"http://{h}:{self.http_port}"
                for h in hosts]

    async def fetch(self, session: aiohttp.ClientSession) -> Snapshot | None:
        """A sibling's snapshot, or None (counted, one log line) after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.section.timeout_s
        problems: dict[str, str] = {}
        headers = {"Authorization": f"Bearer {self.token}"}
        while True:
            for url in await self.siblings():
                left_s = deadline - loop.time()
                if left_s <= 0:
                    break
                try:
                    async with session.get(f"{url}{SNAPSHOT_PATH}", headers=headers,
                                           timeout=aiohttp.ClientTimeout(total=left_s)) as resp:
                        if resp.status != 200:
                            problems[url] = f"HTTP {resp.status}"
                            continue
                        data = await resp.read()
                    snapshot = decode(data)
                except (aiohttp.ClientError, TimeoutError, SnapshotError) as exc:
                    problems[url] = f"{type(exc).__name__}: {exc}"
                    continue
                if snapshot.replica != self.replica:
                    log.info("warm start: %d bytes from %s", len(data), url)
                    return snapshot
            left_s = deadline - loop.time()
            if left_s <= 0:
                break
            await asyncio.sleep(min(_RETRY_S, left_s))
        self.metrics.warm_starts.labels("cold").inc()
        self.phase = "done"
        log.warning("warm start: no sibling answered within %.1fs (%s); starting cold",
                    self.section.timeout_s,
                    "; ".join(f"{u}: {p}" for u, p in sorted(problems.items())) or "no siblings")
        return None

    def load(self, snapshot: Snapshot, ingestor: KvEventIngestor) -> None:
        """Into the index and the ingestor (before any source is added to it)."""
        try:
            restored = set(image.restore(self.index, snapshot.image))
        except ValueError as exc:  # decode checked it already: a bug, not a reason to stop
            log.warning("warm start: snapshot from replica %s not loaded (%s); starting cold",
                        snapshot.replica, exc)
            self.metrics.warm_starts.labels("cold").inc()
            self.phase = "done"
            return
        ingestor.restore_positions([p for p in snapshot.streams if p.backend_id in restored])
        entries = sum(len(b.positions) for b in snapshot.image.backends
                      if b.backend_id in restored)
        self.metrics.warm_restored.set(entries)
        self.metrics.warm_starts.labels("warm").inc()
        log.info("warm start: %d entries of %d backends from replica %s (taken %.1fs ago)",
                 entries, len(restored), snapshot.replica, max(0.0, time.time()
                                                                - snapshot.taken_at_s))
        self._catch_up_deadline_s = time.monotonic() + self.section.catch_up_timeout_s
        self.phase = "catching_up"
