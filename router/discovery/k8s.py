"""Kubernetes discovery: list + watch the pods of one namespace matching a label selector.

Algorithm (client-go's reflector, reduced to pods): list, remember the list's
``resourceVersion``, watch from it, and move the version forward with every event (bookmarks
included). A watch the server ends normally is resumed from the last version. ``410 Gone``,
as an HTTP status or as an ERROR event, means the version was compacted away: list again and
replace the whole set, which also drops pods deleted while we were not watching. Any other
failure (dropped connection, 5xx, garbage) is counted and retried after an exponential
backoff with jitter from the injected RNG, resuming from the last version.

A pod is a backend when its ``Ready`` condition is True, it has an IP and it is not being
deleted. Labels or annotations (annotations win; label values cannot hold ``/``) describe it:

    kvrouter.io/role                     mixed | prefill | decode      (default params.role)
    kvrouter.io/model                    served model name(s), comma-separated
    kvrouter.io/engine                   vllm | sglang                 (default params.engine)
    kvrouter.io/port                     HTTP port                     (default params.port)
    kvrouter.io/kv-events-endpoint       ZMQ endpoint, e.g. tcp://*:5557 (``*`` -> pod IP)
    kvrouter.io/kv-events-replay-endpoint
    kvrouter.io/kv-events-topic
    kvrouter.io/data-parallel-size       N ranks; rank r uses both ports + r (vLLM's layout)

Without an events endpoint and with ``params.ask_event_sources`` the pod's own
``/kv_event_sources`` is asked here (off by default: the KV-event plumbing asks every backend
in the pool itself; turn it on when ingestion is fed through discovery's hook). A pod whose annotations cannot be read is skipped and counted
(``invalid_backend``). Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import aiohttp

from policies.types import EngineKind, Role
from router.config.discovery import KubernetesParams
from router.discovery.backend_set import (
    BackendSet,
    DiscoveredBackend,
    DiscoveryMetrics,
    EventSource,
    EventSourceFetcher,
    backend_url,
    resolve_endpoint,
)
from router.discovery.kube_client import KubeClient, KubeConfig, KubeError, KubeGone

__all__ = ["KubernetesDiscovery", "KubernetesParams", "PodError", "backend_from_pod"]

log = logging.getLogger("kvrouter.discovery")

PREFIX = "kvrouter.io/"


class PodError(ValueError):
    pass


def _meta(pod: Mapping[str, Any], key: str) -> str | None:
    metadata = pod.get("metadata") or {}
    for table in (metadata.get("annotations") or {}, metadata.get("labels") or {}):
        value = table.get(PREFIX + key)
        if value is not None:
            return str(value).strip()
    return None


def pod_name(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '?')}"


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False  # terminating: drain now, before readiness catches up
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
        if isinstance(c, Mapping)
    )


def _int(value: str, key: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise PodError(f"{PREFIX}{key}={value!r}: expected an integer in {low}..{high}")
    return int(value)


def _shift_port(endpoint: str, by: int) -> str:
    head, _, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + by}"


def backend_from_pod(pod: Mapping[str, Any], params: KubernetesParams) -> DiscoveredBackend | None:
    """The backend a pod stands for, None when it is not ready; PodError on bad annotations."""
    if not pod_is_ready(pod):
        return None
    ip = str(pod["status"]["podIP"])
    role_s = _meta(pod, "role") or params.role
    engine_s = _meta(pod, "engine") or params.engine
    try:
        role, engine = Role(role_s), EngineKind(engine_s)
    except ValueError:
        raise PodError(f"{PREFIX}role={role_s!r} or {PREFIX}engine={engine_s!r} unknown") from None
    port_s = _meta(pod, "port")
    port = _int(port_s, "port", 1, 65535) if port_s else params.port
    models = tuple(m.strip() for m in (_meta(pod, "model") or "").split(",") if m.strip())
    sources: list[EventSource] = []
    endpoint = _meta(pod, "kv-events-endpoint")
    if endpoint:
        dp_s = _meta(pod, "data-parallel-size")
        ranks = _int(dp_s, "data-parallel-size", 1, 1024) if dp_s else 1
        replay = _meta(pod, "kv-events-replay-endpoint")
        topic = _meta(pod, "kv-events-topic") or ""
        try:
            resolve_endpoint(endpoint, ip)  # a malformed endpoint fails here, with its reason
            if replay:
                resolve_endpoint(replay, ip)
            for rank in range(ranks):
                resolved, binds = resolve_endpoint(_shift_port(endpoint, rank), ip)
                sources.append(
                    EventSource(
                        endpoint=resolved,
                        replay_endpoint=resolve_endpoint(_shift_port(replay, rank), ip)[0]
                        if replay
                        else None,
                        topic=topic,
                        data_parallel_rank=rank,
                        engine_binds=binds,
                    )
                )
        except ValueError as exc:
            raise PodError(f"{PREFIX}kv-events-*: {exc}") from None
    return DiscoveredBackend(
        url=backend_url(ip, port),
        role=role,
        engine=engine,
        models=models,
        event_sources=tuple(sources),
        ask_event_sources=not sources and params.ask_event_sources,
        origin=f"k8s:{pod_name(pod)}",
    )


class KubernetesDiscovery:
    """Keeps a ``BackendSet`` equal to the ready pods matching the selector. ``run`` forever."""

    def __init__(
        self,
        config: KubeConfig,
        params: KubernetesParams,
        backends: BackendSet,
        metrics: DiscoveryMetrics,
        rng: random.Random,
    ) -> None:
        self._config = config
        self._params = params
        self._set = backends
        self._metrics = metrics
        self._rng = rng
        self._fetcher = EventSourceFetcher(metrics)
        self.namespace = params.namespace or config.namespace or "default"
        self._pods: dict[str, DiscoveredBackend] = {}
        self.resource_version: str | None = None
        self.lists = 0
        self._watch_events = 0

    async def run(self) -> None:
        async with KubeClient(self._config) as kube:
            failures = 0
            gone = 0  # 410s in a row without an event between them
            while True:
                try:
                    if self.resource_version is None:
                        await self._list(kube)
                    if await self._watch(kube):
                        failures = gone = 0
                        continue
                    reason = "watch ended without events"
                except KubeGone as exc:
                    self._metrics.count("relist")
                    self.resource_version = None
                    gone = 1 if self._watch_events else gone + 1
                    if gone == 1:
                        log.info("k8s: %s; listing pods again", exc)
                        continue
                    # Gone again straight after a fresh list: do not hammer the API server.
                    reason = f"{exc} (again, right after listing)"
                except (KubeError, aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
                    self._metrics.count("watch_error")
                    reason = f"{type(exc).__name__}: {exc}"
                failures += 1
                delay_s = self._backoff_s(failures)
                log.warning("k8s: %s; retrying in %.2f s", reason, delay_s)
                await asyncio.sleep(delay_s)

    def _backoff_s(self, failures: int) -> float:
        ceiling = min(
            self._params.backoff_max_s, self._params.backoff_initial_s * 2.0 ** min(failures - 1, 30)
        )
        # Half fixed, half jitter: replicas that lost the API server together come back apart.
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def _list(self, kube: KubeClient) -> None:
        pods = await kube.list_pods(self.namespace, self._params.label_selector)
        self.lists += 1
        self._pods = {}
        for pod in pods.items:
            self._take(pod)
        self.resource_version = pods.resource_version
        await self._publish(kube)

    async def _watch(self, kube: KubeClient) -> bool:
        """One watch until the server ends it; True if anything arrived."""
        assert self.resource_version is not None
        got_any = False
        self._watch_events = 0
        async for event in kube.watch_pods(
            self.namespace, self._params.label_selector, self.resource_version,
            self._params.watch_timeout_s,
        ):
            got_any = True
            self._watch_events += 1
            pod = event.object
            version = (pod.get("metadata") or {}).get("resourceVersion")
            if event.type in ("ADDED", "MODIFIED"):
                self._take(pod)
            elif event.type == "DELETED":
                self._pods.pop(_key(pod), None)
            elif event.type != "BOOKMARK":
                log.warning("k8s: ignoring watch event of type %r", event.type)
            if version:
                self.resource_version = str(version)
            if event.type != "BOOKMARK":
                await self._publish(kube)
        return got_any

    def _take(self, pod: Mapping[str, Any]) -> None:
        key = _key(pod)
        try:
            backend = backend_from_pod(pod, self._params)
        except PodError as exc:
            self._metrics.count("invalid_backend")
            log.warning("k8s: pod %s skipped: %s", pod_name(pod), exc)
            backend = None
        if backend is None:
            self._pods.pop(key, None)
            return
        old = self._pods.get(key)
        if old is not None and old.url == backend.url and backend.ask_event_sources:
            # Same engine at the same address: keep what it already told us.
            backend = replace(
                backend, event_sources=old.event_sources, ask_event_sources=old.ask_event_sources
            )
        self._pods[key] = backend

    async def _publish(self, kube: KubeClient) -> None:
        for key, backend in list(self._pods.items()):
            if backend.ask_event_sources:
                host = backend.url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
                self._pods[key] = await self._fetcher.complete(backend, host, kube.session)
        self._fetcher.retain(b.url for b in self._pods.values())
        self._set.replace(self._pods.values())


def _key(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return str(metadata.get("uid") or pod_name(pod))
