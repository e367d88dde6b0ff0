"""``kvrouter serve --workers N``: N router processes on one port, routing as one router.

One Python process routes on one core. With ``--workers N`` the parent process starts N
worker processes (``multiprocessing`` spawn: each builds its own app, index and event loop)
and waits; each worker listens on the same host:port with ``SO_REUSEPORT``, so the kernel
spreads incoming connections over them, and each is a replica synced with its siblings over
Unix sockets in a private run directory (``router.sync``, ``policies.replica_sync``): every
worker's policy sees the whole pod's in-flight work, cold-prefix placement and approximate
record.

Metrics, as Prometheus users expect of multi-process servers: a scrape reaches whichever
worker the kernel picks, and that worker answers for all of them, each sample labelled
``worker="i"`` (sum by the other labels for pod totals). Each worker also serves its own
metrics on a private 127.0.0.1 port written to the run directory, where its siblings fetch
them; a sibling that does not answer in time is left out of that scrape (logged, counted in
``kvrouter_worker_scrape_errors_total``).

The parent forwards SIGINT/SIGTERM to the workers and exits when they have; if one worker
dies, the others are stopped and the parent exits with its status. Must not import
``simulator``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from router.config import Config
from router.http.messages import Request, Response
from router.http.server import HttpServer

__all__ = ["WorkerMetrics", "merge_metrics", "run_workers", "worker_config"]

log = logging.getLogger("kvrouter.workers")

_SIBLING_TIMEOUT_S = 2.0


def sync_endpoint(run_dir: Path, index: int) -> str:
    # A Unix stream socket on the event loop, not ZeroMQ's ipc://: no I/O thread to wake
    # for every frame on either side (router.sync.unix).
    return f"unix://{run_dir}/sync-{index}.sock"


def worker_config(config: Config, index: int, count: int, run_dir: Path, port: int) -> Config:
    """Worker ``index``'s config: the shared port, and replica sync with its siblings."""
    sync = dataclasses.replace(
        config.sync,
        enabled=True,
        bind=sync_endpoint(run_dir, index),
        peers=tuple(sync_endpoint(run_dir, j) for j in range(count) if j != index),
        discover_interval_s=min(config.sync.discover_interval_s, 1.0),
        batch_frames=True,  # siblings are one version: every one reads batches
        replica_id=f"{socket.gethostname()}-worker{index}-{os.getpid()}",
    )
    server = dataclasses.replace(config.server, port=port)
    return dataclasses.replace(config, server=server, sync=sync)


# ---- metrics over every worker ------------------------------------------------------------

def merge_metrics(texts: Iterable[tuple[str, str]]) -> bytes:
    """One exposition from several workers' (worker label, exposition text) pairs."""
    families: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "worker": worker},
                                  sample.value, sample.timestamp, sample.exemplar)

    class _Merged:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class WorkerMetrics:
    """Serves this worker's own metrics privately and answers ``/metrics`` for all workers."""

    def __init__(self, index: int, count: int, run_dir: Path, registry: CollectorRegistry,
                 local: Callable[[], bytes], session: Callable[[], aiohttp.ClientSession]) -> None:
        self.index = index
        self.count = count
        self.run_dir = run_dir
        self.local = local
        self.session = session
        self.errors = Counter("kvrouter_worker_scrape_errors",
                              "Sibling workers that did not answer a metrics scrape in time.",
                              registry=registry)
        self._server: HttpServer | None = None

    async def start(self) -> None:
        async def own(request: Request) -> Response:
            return Response(body=self.local(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        def error(status: int, message: str, request: Request | None) -> Response:
            return Response(status=status, body=message.encode())

        self._server = HttpServer(own, error, max_body_bytes=1024)
        port = await self._server.start("127.0.0.1", 0)
        path = self.run_dir / f"metrics-{self.index}.port"
        path.with_suffix(".tmp").write_text(str(port))
        path.with_suffix(".tmp").replace(path)  # siblings never read half a file

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close(1.0)
            self._server = None

    async def _sibling(self, index: int) -> tuple[str, str] | None:
        try:
            port = int((self.run_dir / f"metrics-{index}.port").read_text())
            timeout = aiohttp.ClientTimeout(total=_SIBLING_TIMEOUT_S)
            async with self.session().get(f"http://127.0.0.1:{port}/metrics",
                                          timeout=timeout) as resp:
                resp.raise_for_status()
                return str(index), await resp.text()
        except (TimeoutError, OSError, ValueError, aiohttp.ClientError) as exc:
            self.errors.inc()
            log.warning("worker %d did not answer a metrics scrape: %s", index, exc)
            return None

    async def handle(self, request: Request) -> Response:
        siblings = await asyncio.gather(*(self._sibling(j) for j in range(self.count)
                                          if j != self.index))
        texts = [(str(self.index), self.local().decode())]
        texts += [t for t in siblings if t is not None]
        return Response(body=merge_metrics(texts), headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---- the parent -----------------------------------------------------------------------------

def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) with SO_REUSEPORT: an ephemeral port is picked once for every worker
    and stays reserved while they start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock, int(sock.getsockname()[1])


def run_workers(args: argparse.Namespace, config: Config, count: int, target: Callable[[argparse.Namespace], int]) -> int:
    """Start ``count`` workers running ``target(worker_args)`` and wait for them."""
    import multiprocessing

    run_dir = Path(tempfile.mkdtemp(prefix="kvrouter-workers-"))
    reserved, port = _reserve_port(config.server.host, config.server.port)
    context = multiprocessing.get_context("spawn")
    workers = []
    try:
        for index in range(count):
            worker_args = argparse.Namespace(**vars(args))
            worker_args.workers = 1
            worker_args.worker = (index, count, str(run_dir), port)
            process = context.Process(target=target, args=(worker_args,),
                                      name=f"kvrouter-worker-{index}")
            process.start()
            workers.append(process)
        log.info("kvrouter: %d workers on port %d", count, port)

        def forward(signum: int, _frame: Any) -> None:
            for process in workers:
                if process.is_alive() and process.pid is not None:
                    os.kill(process.pid, signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)
        status = 0
        while any(p.is_alive() for p in workers):
            for process in workers:
                process.join(0.2)
                if not process.is_alive() and process.exitcode and not status:
                    status = process.exitcode
                    log.error("%s exited with %s: stopping the others", process.name,
                              process.exitcode)
                    forward(signal.SIGTERM, None)
        return status
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()
            process.join(5)
        reserved.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(run_dir)
