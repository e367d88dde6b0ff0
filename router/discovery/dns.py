"""DNS discovery: the A/AAAA or SRV records of a headless Service, re-resolved on an interval.

A headless Service (``clusterIP: None``) answers its name with one A record per ready pod,
and ``_<port>._tcp.<service>.<ns>.svc.<zone>`` with one SRV record per ready pod and named
port. A/AAAA names go through the event loop's resolver (``loop.getaddrinfo``, the system's
rules and ``/etc/hosts``); SRV needs a real DNS client, dnspython's async resolver, which also
resolves the SRV targets (``nameserver`` points both at a given server instead of
``/etc/resolv.conf``).

The name not existing (NXDOMAIN, or no records) means no backend is ready: the set empties.
Any other failure (timeout, SERVFAIL, no reachable server) keeps the previous set, is counted
as ``resolve_error`` and logged: a DNS hiccup must not drain a healthy fleet. Every backend
found this way has the same role, engine and models (from the params). Must not import
``simulator``.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver

from policies.types import EngineKind, Role
from router.config.discovery import DnsParams
from router.discovery.backend_set import (
    BackendSet,
    DiscoveredBackend,
    DiscoveryMetrics,
    EventSourceFetcher,
    backend_url,
)

__all__ = ["DnsDiscovery", "DnsParams"]

log = logging.getLogger("kvrouter.discovery")

_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6, "any": socket.AF_UNSPEC}


class _NoRecords(Exception):
    """The name exists nowhere or has no records of the asked type: nothing is ready."""


class DnsDiscovery:
    """Keeps a ``BackendSet`` equal to what the name resolves to. ``run`` forever."""

    def __init__(
        self, params: DnsParams, backends: BackendSet, metrics: DiscoveryMetrics
    ) -> None:
        self._params = params
        self._set = backends
        self._metrics = metrics
        self._fetcher = EventSourceFetcher(metrics)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self.resolutions = 0

    def _dns(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self._params.nameserver:
                host, _, port = self._params.nameserver.rpartition(":")
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [host]
                resolver.port = int(port)
            else:
                resolver = dns.asyncresolver.Resolver()
            resolver.lifetime = self._params.timeout_s
            self._resolver = resolver
        return self._resolver

    async def addresses(self) -> list[tuple[str, int]]:
        """(ip, port) pairs the name stands for now, sorted; raises _NoRecords or an error."""
        if self._params.srv:
            return await self._srv()
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(
                    self._params.name, self._params.port,
                    family=_FAMILIES[self._params.address_family], type=socket.SOCK_STREAM,
                ),
                self._params.timeout_s,
            )
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                raise _NoRecords(str(exc)) from None
            raise
        return sorted({(str(info[4][0]), self._params.port) for info in infos})

    async def _srv(self) -> list[tuple[str, int]]:
        resolver = self._dns()
        try:
            answer = await resolver.resolve(self._params.name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            raise _NoRecords(str(exc)) from None
        rdtypes = {"ipv4": ("A",), "ipv6": ("AAAA",), "any": ("A", "AAAA")}
        found: set[tuple[str, int]] = set()
        for record in answer:
            target = record.target.to_text()
            for rdtype in rdtypes[self._params.address_family]:
                try:
                    addresses = await resolver.resolve(target, rdtype)
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                    continue  # a target without this family: the other one may have it
                found.update((a.to_text(), int(record.port)) for a in addresses)
        return sorted(found)

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await self.refresh(session)
                await asyncio.sleep(self._params.interval_s)

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        p = self._params
        try:
            addresses = await self.addresses()
        except _NoRecords as exc:
            log.info("dns: %s has no records (%s): no backend is ready", p.name, exc)
            addresses = []
        except (OSError, TimeoutError, dns.exception.DNSException) as exc:
            self._metrics.count("resolve_error")
            log.warning("dns: cannot resolve %s: %s; keeping %d backends",
                        p.name, exc or type(exc).__name__, len(self._set.backends))
            return
        self.resolutions += 1
        snapshot = []
        for host, port in addresses:
            backend = DiscoveredBackend(
                url=backend_url(host, port), role=Role(p.role), engine=EngineKind(p.engine),
                models=p.models, ask_event_sources=p.ask_event_sources, origin=f"dns:{p.name}",
            )
            snapshot.append(await self._fetcher.complete(backend, host, session))
        self._fetcher.retain(b.url for b in snapshot)
        self._set.replace(snapshot)
