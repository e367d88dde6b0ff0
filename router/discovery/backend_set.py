"""Backend discovery: the values every source produces and the set that turns them into changes.

Three sources find backends: static config (``router.setup.discovery``), DNS records of a headless
Service (``discovery_dns``) and the Kubernetes API (``discovery_k8s``). Each one computes the
backends it currently sees and hands the whole snapshot to a ``BackendSet``, which diffs it
against the previous one and tells a ``BackendSink`` (the pool) what was added, updated or
removed. A removed backend is drained by the sink: no new requests, in-flight ones finish, its
index entries are purged. Every change is a log line and a count in
``kvrouter_discovery_events_total{kind}``; ``kvrouter_discovered_backends`` is the set's size.

A backend's KV-event sources (one per data-parallel rank) come from pod annotations or from
the backend's own ``GET /kv_event_sources`` (vLLM answers a JSON array of
``{data_parallel_rank, endpoint, replay_endpoint, topic}``); see ``event_sources_from_json``.

Must not import ``simulator`` or other ``router`` modules (the pool adapts to ``BackendSink``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from policies.types import BackendId, EngineKind, Role

__all__ = [
    "BackendSet",
    "BackendSink",
    "DiscoveredBackend",
    "DiscoveryMetrics",
    "EventSource",
    "EventSourceFetcher",
    "backend_url",
    "event_sources_from_json",
    "resolve_endpoint",
]

log = logging.getLogger("kvrouter.discovery")


@dataclass(frozen=True, slots=True)
class EventSource:
    """One engine rank's KV-event stream.

    ``engine_binds`` is True when the engine's PUB socket binds (vLLM binds when the configured
    endpoint has ``*`` or ``::``, or is ipc/inproc) so subscribers connect to ``endpoint``;
    False when the engine connects out to ``endpoint``, which the subscriber must bind. Only
    the first kind can feed several router replicas at once.
    """

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    data_parallel_rank: int = 0
    engine_binds: bool = True


@dataclass(frozen=True, slots=True)
class DiscoveredBackend:
    """A backend as a discovery source sees it. ``url`` is its base URL and its backend id.

    ``models`` empty means the source does not know; the pool may ask ``/v1/models``.
    ``ask_event_sources`` means the source was told to fetch ``/kv_event_sources`` and has not
    got an answer yet. ``origin`` names where it came from, for logs (``k8s:ns/pod``...).
    """

    url: BackendId
    role: Role = Role.MIXED
    engine: EngineKind = EngineKind.VLLM
    models: tuple[str, ...] = ()
    event_sources: tuple[EventSource, ...] = ()
    ask_event_sources: bool = False
    origin: str = ""


class BackendSink(Protocol):
    """What discovery drives: the pool, or an adapter in front of it."""

    def backend_added(self, backend: DiscoveredBackend) -> None: ...

    def backend_updated(self, backend: DiscoveredBackend) -> None: ...

    def backend_removed(self, backend_id: BackendId) -> None: ...


class DiscoveryMetrics:
    """The discovery counters, registered on the registry the app's ``/metrics`` serves."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.events = Counter(
            "kvrouter_discovery_events_total",
            "Discovery changes and problems, by kind (added, updated, removed, relist, "
            "watch_error, resolve_error, invalid_backend, event_sources_error).",
            ["kind"],
            registry=registry,
        )
        self.backends = Gauge(
            "kvrouter_discovered_backends",
            "Backends the discovery source currently sees as ready.",
            registry=registry,
        )

    def count(self, kind: str, n: int = 1) -> None:
        self.events.labels(kind=kind).inc(n)


class BackendSet:
    """The backends one source currently sees; ``replace`` diffs a new snapshot into changes.

    Plain data plus callbacks: no tasks, no I/O. ``synced`` turns True after the first
    snapshot so readiness can wait for discovery.
    """

    def __init__(self, sink: BackendSink, metrics: DiscoveryMetrics, source: str) -> None:
        self._sink = sink
        self._metrics = metrics
        self._source = source
        self._current: dict[BackendId, DiscoveredBackend] = {}
        self.synced = False

    @property
    def backends(self) -> Mapping[BackendId, DiscoveredBackend]:
        return dict(self._current)

    def replace(self, snapshot: Iterable[DiscoveredBackend]) -> None:
        new: dict[BackendId, DiscoveredBackend] = {}
        for backend in snapshot:
            seen = new.get(backend.url)
            if seen is not None:
                # Two pods claiming one URL can only be a stale record; keep the first.
                log.warning(
                    "%s: %s and %s both claim %s; keeping the first",
                    self._source, seen.origin, backend.origin, backend.url,
                )
                continue
            new[backend.url] = backend
        for url in [u for u in self._current if u not in new]:
            old = self._current.pop(url)
            self._metrics.count("removed")
            log.info("%s: backend %s (%s) left; draining", self._source, url, old.origin)
            self._sink.backend_removed(url)
        for url, backend in new.items():
            old_backend = self._current.get(url)
            if old_backend == backend:
                continue
            self._current[url] = backend
            if old_backend is None:
                self._metrics.count("added")
                log.info("%s: backend %s joined (%s)", self._source, url, _describe(backend))
                self._sink.backend_added(backend)
            else:
                self._metrics.count("updated")
                log.info("%s: backend %s changed (%s)", self._source, url, _describe(backend))
                self._sink.backend_updated(backend)
        self._metrics.backends.set(len(self._current))
        self.synced = True


def _describe(backend: DiscoveredBackend) -> str:
    models = ",".join(backend.models) or "?"
    return (
        f"{backend.origin} role={backend.role} engine={backend.engine} models={models} "
        f"event_sources={len(backend.event_sources)}"
    )


def backend_url(host: str, port: int, scheme: str = "http") -> str:
    """Base URL of a backend at ``host:port``; IPv6 addresses get brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def resolve_endpoint(endpoint: str, host: str) -> tuple[str, bool]:
    """Make an engine's configured ZMQ endpoint reachable from the router.

    Returns ``(endpoint, engine_binds)``. A wildcard host (``*``, ``::``, and ``0.0.0.0``,
    which vLLM's ``/kv_event_sources`` reports for a socket it bound) is replaced by the
    backend's ``host`` (a pod IP). Any other tcp host is where the engine connects to (vLLM's
    rule), and is returned as is.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return endpoint, True
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"not a ZMQ endpoint: {endpoint!r}")
    address, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"ZMQ endpoint has no port: {endpoint!r}")
    if address in ("*", "::", "[::]", "0.0.0.0"):
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}", True
    return endpoint, False


def event_sources_from_json(payload: object, host: str) -> tuple[EventSource, ...]:
    """Parse a ``GET /kv_event_sources`` answer (a JSON array, one entry per DP rank).

    Raises ValueError naming the offending entry; entries without an endpoint (events
    disabled on that rank) are skipped.
    """
    if isinstance(payload, Mapping) and "sources" in payload:
        payload = payload["sources"]
    if not isinstance(payload, list):
        raise ValueError("kv_event_sources: expected a JSON array")
    sources: list[EventSource] = []
    for i, entry in enumerate(payload):
        if not isinstance(entry, Mapping):
            raise ValueError(f"kv_event_sources[{i}]: expected an object")
        endpoint = entry.get("endpoint")
        if not endpoint:
            continue
        if not isinstance(endpoint, str):
            raise ValueError(f"kv_event_sources[{i}].endpoint: expected a string")
        rank = entry.get("data_parallel_rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"kv_event_sources[{i}].data_parallel_rank: expected an integer >= 0")
        resolved, binds = resolve_endpoint(endpoint, host)
        replay = entry.get("replay_endpoint")
        if replay is not None and not isinstance(replay, str):
            raise ValueError(f"kv_event_sources[{i}].replay_endpoint: expected a string")
        topic = entry.get("topic") or ""
        if not isinstance(topic, str):
            raise ValueError(f"kv_event_sources[{i}].topic: expected a string")
        sources.append(
            EventSource(
                endpoint=resolved,
                replay_endpoint=resolve_endpoint(replay, host)[0] if replay else None,
                topic=topic,
                data_parallel_rank=rank,
                engine_binds=binds,
            )
        )
    return tuple(sorted(sources, key=lambda s: s.data_parallel_rank))


class EventSourceFetcher:
    """Fills in ``event_sources`` of backends marked ``ask_event_sources`` by asking them.

    One answer per URL is remembered (an engine's event config does not change while it
    runs); a failed ask is counted, logged, and retried no sooner than ``retry_s`` later, the
    backend meanwhile joining without event sources (approximate mode).
    """

    def __init__(self, metrics: DiscoveryMetrics, timeout_s: float = 5.0, retry_s: float = 30.0):
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retry_s = retry_s
        self._known: dict[BackendId, tuple[EventSource, ...]] = {}
        self._failed_at: dict[BackendId, float] = {}

    async def complete(
        self, backend: DiscoveredBackend, host: str, session: aiohttp.ClientSession
    ) -> DiscoveredBackend:
        if not backend.ask_event_sources:
            return backend
        sources = self._known.get(backend.url)
        if sources is None:
            failed_at = self._failed_at.get(backend.url)
            if failed_at is not None and time.monotonic() - failed_at < self._retry_s:
                return backend
            try:
                async with session.get(
                    f"{backend.url}/kv_event_sources", timeout=self._timeout
                ) as resp:
                    resp.raise_for_status()
                    sources = event_sources_from_json(await resp.json(content_type=None), host)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self._failed_at[backend.url] = time.monotonic()
                self._metrics.count("event_sources_error")
                log.warning("cannot read %s/kv_event_sources: %s", backend.url, exc)
                return backend
            self._known[backend.url] = sources
            self._failed_at.pop(backend.url, None)
        return replace(backend, event_sources=sources, ask_event_sources=False)

    def retain(self, urls: Iterable[BackendId]) -> None:
        """Forget backends that left, so a new engine at a reused address is asked again."""
        keep = set(urls)
        for table in (self._known, self._failed_at):
            for url in [u for u in table if u not in keep]:
                del table[url]
