"""The app's discovery task that drives the pool, from the parsed ``discovery`` section
(``router.config.discovery.DiscoveryConfig``: static, dns or kubernetes).

``backends`` from the config stay in every mode; discovery adds and removes the rest. A
backend that leaves is drained: ``BackendPool.remove`` takes it out of every later snapshot
(no new requests) while requests already holding it finish, the policy forgets it and its
prefix-index entries are purged.

Must not import ``simulator``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import zmq

from policies.kv.index import PrefixIndex
from policies.types import BackendId, EngineKind, Role
from router.config import Config, ConfigError
from router.config.discovery import DiscoveryMode, KubernetesParams
from router.discovery.backend_set import (
    BackendSet,
    DiscoveredBackend,
    DiscoveryMetrics,
    EventSource,
)
from router.discovery.dns import DnsDiscovery
from router.discovery.k8s import KubernetesDiscovery
from router.discovery.kube_client import (
    KubeConfig,
    KubeConfigError,
    in_cluster_config,
    kubeconfig_config,
)
from router.kv.events import KvEventIngestor
from router.kv.sources import KvEventSource
from router.pool import BackendPool

__all__ = [
    "EventSourcesHook",
    "PoolSink",
    "discovery_background",
    "ingestion_hook",
    "kv_event_source",
]

log = logging.getLogger("kvrouter.discovery")

EventSourcesHook = Callable[[BackendId, tuple[EventSource, ...]], None]
"""Told a discovered backend's KV-event sources (one per data-parallel rank) whenever they
change, and ``()`` when the backend leaves: the seam for KV-event ingestion to subscribe."""


class PoolSink:
    """Applies discovery changes to the pool; never touches backends it did not add."""

    def __init__(
        self, pool: BackendPool, index: PrefixIndex | None,
        on_event_sources: EventSourcesHook | None = None,
    ) -> None:
        self._pool = pool
        self._index = index
        self._on_event_sources = on_event_sources
        self._ours: set[BackendId] = set()
        self._sources: dict[BackendId, tuple[EventSource, ...]] = {}

    def _tell_sources(self, backend_id: BackendId, sources: tuple[EventSource, ...]) -> None:
        if self._on_event_sources is None or self._sources.get(backend_id, ()) == sources:
            return
        self._sources[backend_id] = sources
        if not sources:
            del self._sources[backend_id]
        self._on_event_sources(backend_id, sources)

    def backend_added(self, backend: DiscoveredBackend) -> None:
        if self._pool.get(backend.url) is not None and backend.url not in self._ours:
            log.warning("discovered %s is already configured in `backends`; leaving it as is",
                        backend.url)
            return
        added = self._pool.add(
            backend.url, role=backend.role, engine=backend.engine, models=backend.models,
            kv_events_endpoint=_first_endpoint(backend),
        )
        self._ours.add(added.backend_id)
        self._name_model(backend)
        self._tell_sources(added.backend_id, backend.event_sources)

    def backend_updated(self, backend: DiscoveredBackend) -> None:
        existing = self._pool.get(backend.url)
        if existing is None or backend.url not in self._ours:
            return
        existing.role = Role(backend.role)
        existing.engine = EngineKind(backend.engine)
        existing.configured_models = backend.models
        existing.kv_events_endpoint = _first_endpoint(backend)
        self._name_model(backend)
        self._tell_sources(backend.url, backend.event_sources)

    def _name_model(self, backend: DiscoveredBackend) -> None:
        # The index rehashes a backend's event token ids in its model's namespace; a backend
        # serving several base models cannot be told apart per event, so it is left unset.
        if self._index is not None and len(backend.models) == 1:
            self._index.set_backend_model(backend.url, backend.models[0])

    def backend_removed(self, backend_id: BackendId) -> None:
        if backend_id not in self._ours:
            return
        self._ours.discard(backend_id)
        self._tell_sources(backend_id, ())
        self._pool.remove(backend_id)
        if self._index is not None:
            self._index.remove_backend(backend_id)


def kv_event_source(backend_id: BackendId, source: EventSource) -> KvEventSource:
    """Discovery's resolved source in ingestion's terms: the endpoint as the engine was
    configured (``tcp://*:P`` when it binds, the host coming from the backend's URL)."""
    endpoint = source.endpoint
    if source.engine_binds and endpoint.startswith("tcp://"):
        endpoint = "tcp://*:" + endpoint.rsplit(":", 1)[1]
    return KvEventSource.for_backend(backend_id, endpoint, source.replay_endpoint, source.topic)


def ingestion_hook(ingestor: KvEventIngestor) -> EventSourcesHook:
    """Subscribe ``ingestor`` to discovered backends' events as they come and go.

    ``add_source`` needs the ingestor running: start its task before discovery's (discovery
    calls this only after its first answer from the API server or DNS). A source the ingestor
    refuses (a fan-in clash) is logged and the backend stays in approximate mode.
    """

    def hook(backend_id: BackendId, sources: tuple[EventSource, ...]) -> None:
        ingestor.remove_backend(backend_id)
        for source in sources:
            try:
                ingestor.add_source(kv_event_source(backend_id, source))
            except (ValueError, OSError, zmq.ZMQError) as exc:
                log.warning("cannot subscribe to %s's KV events at %s: %s",
                            backend_id, source.endpoint, exc)

    return hook


def _first_endpoint(backend: DiscoveredBackend) -> str | None:
    # The pool keeps the endpoint as the engine was configured (``tcp://*:P`` for an engine
    # that binds), the form ingestion reads when a backend has no /kv_event_sources.
    if not backend.event_sources:
        return None
    return kv_event_source(backend.url, backend.event_sources[0]).endpoint


def _kube_config(params: KubernetesParams, environ: Mapping[str, str]) -> KubeConfig:
    try:
        if params.kubeconfig:
            return kubeconfig_config(Path(params.kubeconfig), params.context or None)
        return in_cluster_config(environ)
    except KubeConfigError as exc:
        raise ConfigError("discovery.kubernetes", str(exc)) from None


def discovery_background(
    config: Config, environ: Mapping[str, str],
    on_event_sources: EventSourcesHook | None = None,
) -> list[Any]:
    """Background factories for ``create_app(background=...)``: none in static mode.

    Credentials are read here, at start-up, so a missing service account or a bad kubeconfig
    is a one-line config error rather than a retry loop.
    """
    parsed = config.discovery
    if parsed.mode is DiscoveryMode.STATIC:
        return []
    kube = _kube_config(parsed.kubernetes, environ) if parsed.kubernetes is not None else None

    def factory(state: Any) -> Coroutine[Any, Any, None]:
        metrics = DiscoveryMetrics(state.metrics.registry)
        # RouterState.index is the app's PrefixIndex, or None without KV plumbing.
        sink = PoolSink(state.pool, state.index, on_event_sources)
        backends = BackendSet(sink, metrics, parsed.mode)
        if parsed.dns is not None:
            return DnsDiscovery(parsed.dns, backends, metrics).run()
        assert parsed.kubernetes is not None and kube is not None
        rng = random.Random(parsed.seed)
        return KubernetesDiscovery(kube, parsed.kubernetes, backends, metrics, rng).run()

    return [factory]
