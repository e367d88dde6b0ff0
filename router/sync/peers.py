"""Where a replica's peers are: the PUB endpoints it subscribes to, and their IPs (the only
addresses allowed to subscribe to its own PUB socket).

Three sources, as for backends: the static ``sync.peers`` list; the A/AAAA records of a
headless Service (``sync.dns_name``, through the event loop's resolver: one record per ready
pod, the replica itself included); pods with a label (``sync.kubernetes_label_selector``,
one list call per round through ``router.discovery.kube_client``; a pod with an IP and not
terminating is a peer even before it is Ready, so a warming replica is heard from). A
replica subscribing to itself is harmless: its own messages are recognised and skipped.

A failed lookup keeps the previous set (a DNS or API hiccup must not drop every peer).
Must not import ``simulator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Mapping
from pathlib import Path

from router.config import ConfigError
from router.config.sync import SyncConfig
from router.discovery.kube_client import (
    KubeClient,
    KubeConfig,
    KubeConfigError,
    KubeError,
    in_cluster_config,
    kubeconfig_config,
)

__all__ = ["PeerFinder", "endpoint_host", "kube_config"]


def endpoint_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint (no brackets), None for ipc://."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint[len("tcp://"):].rpartition(":")[0].strip("[]") or None


def _tcp(ip: str, port: int) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(ip).version == 6:
            return f"tcp://[{ip}]:{port}"
    return f"tcp://{ip}:{port}"


def kube_config(config: SyncConfig, environ: Mapping[str, str]) -> KubeConfig | None:
    """Read at start-up, so a missing service account is a config error, not a retry loop."""
    if not config.kubernetes_label_selector:
        return None
    try:
        if config.kubeconfig:
            return kubeconfig_config(Path(config.kubeconfig))
        return in_cluster_config(environ)
    except KubeConfigError as exc:
        raise ConfigError("sync.kubernetes_label_selector", str(exc)) from None


class PeerFinder:
    def __init__(self, config: SyncConfig, kube: KubeConfig | None) -> None:
        self.config = config
        self.kube = kube
        self._dns: frozenset[str] = frozenset()
        self._pods: frozenset[str] = frozenset()

    async def find(self) -> frozenset[str]:
        """Every peer endpoint known now; raises nothing (failures keep the last answer)."""
        c = self.config
        if c.dns_name:
            with contextlib.suppress(OSError):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    c.dns_name, c.port, type=socket.SOCK_STREAM)
                self._dns = frozenset(_tcp(str(info[4][0]), c.port) for info in infos)
        if self.kube is not None:
            with contextlib.suppress(KubeError, OSError, asyncio.TimeoutError, ValueError):
                self._pods = await self._list_pods()
        return frozenset(c.peers) | self._dns | self._pods

    async def _list_pods(self) -> frozenset[str]:
        assert self.kube is not None
        namespace = self.config.kubernetes_namespace or self.kube.namespace or "default"
        async with KubeClient(self.kube) as client:
            pods = await client.list_pods(namespace, self.config.kubernetes_label_selector)
        out = set()
        for pod in pods.items:
            status = pod.get("status") or {}
            if (pod.get("metadata") or {}).get("deletionTimestamp") or not status.get("podIP"):
                continue
            out.add(_tcp(str(status["podIP"]), self.config.port))
        return frozenset(out)
