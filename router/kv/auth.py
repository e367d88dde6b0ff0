"""Who may publish KV events into a socket the router binds: the backends' own addresses.

A bound event socket takes connections from anyone who can reach it, and one forged message
can erase a backend's index entries (a "restart" at sequence 0) or fill the index with
blocks no engine holds. So every socket the router binds asks ZeroMQ's ZAP handler
(``zmq.auth.asyncio.AsyncioAuthenticator``, on the ingestor's context) about each peer before
its first message: a peer whose IP is one of the current backends' (their hosts, resolved
when they are names) or in ``kv_events.allow_from`` is let in; any other is refused during
the handshake, so nothing it sends is read, and counted in
``kvrouter_kv_event_connections_refused``. The allow-list follows discovery: ``set_hosts`` is
called whenever the sources change. An empty list refuses everyone (pyzmq's own handler would
let every NULL peer in until something is allowed).

Sockets the router connects (to engines that bind) need no gate: the router chose the peer.
The replica-sync PUB socket (``router.sync``) is gated the same way, with its peers' IPs.
Must not import aiohttp or other ``router`` modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import Any, Protocol

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

__all__ = ["ZAP_DOMAIN", "EventSocketGate", "RefusalCounter"]

log = logging.getLogger("kvrouter.kv_events")

ZAP_DOMAIN = b"kvrouter-kv-events"
_MAX_LOGGED = 64  # refused addresses logged once each, up to this many


class _Counter(Protocol):
    def inc(self) -> None: ...


class RefusalCounter(Protocol):
    """What the gate counts refusals in: ``KvMetrics`` here, the sync metrics for the replica
    sync socket (``router.sync``), which is gated the same way."""

    @property
    def refused(self) -> _Counter: ...


class _AllowList(AsyncioAuthenticator):
    """pyzmq's asyncio ZAP handler, answering from a strict allow-list of peer IPs."""

    def __init__(self, context: zmq.asyncio.Context, metrics: RefusalCounter,
                 what: str) -> None:
        super().__init__(context)
        self.addresses: frozenset[str] = frozenset()
        self.metrics = metrics
        self.what = what
        self.logged: set[str] = set()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # ZAP request frames (RFC 27): version, request id, domain, address, identity,
        # mechanism, credentials...
        if len(msg) < 6:
            if len(msg) >= 2:
                self._send_zap_reply(msg[1], b"400", b"Not enough frames")
            return
        request_id, address = msg[1], msg[3].decode("ascii", "replace")
        if msg[0] == b"1.0" and msg[5] == b"NULL" and address in self.addresses:
            self._send_zap_reply(request_id, b"200", b"OK", "backend")
            return
        self.metrics.refused.inc()
        if address not in self.logged and len(self.logged) < _MAX_LOGGED:
            self.logged.add(address)
            log.warning("refused a %s connection from %s: not an allowed address",
                        self.what, address)
        self._send_zap_reply(request_id, b"400", b"Address not allowed")


class EventSocketGate:
    """The allow-list of the sockets the router binds; ``start``/``stop`` pair with the
    ingestor's context."""

    def __init__(self, metrics: RefusalCounter, allow_from: Iterable[str] = (),
                 what: str = "KV-event") -> None:
        self.metrics = metrics
        self.what = what
        self.allow_from = frozenset(allow_from)
        self._auth: _AllowList | None = None
        self._hosts: frozenset[str] = frozenset()
        self._resolved: dict[str, frozenset[str]] = {}
        self._resolving: set[asyncio.Task[None]] = set()

    def start(self, context: zmq.asyncio.Context) -> None:
        self._auth = _AllowList(context, self.metrics, self.what)
        self._auth.start()
        self._publish()

    def stop(self) -> None:
        for task in self._resolving:
            task.cancel()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    @staticmethod
    def protect(sock: zmq.Socket[Any]) -> None:
        """Make a socket about to bind ask the gate about every peer."""
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    @property
    def addresses(self) -> frozenset[str]:
        return self._auth.addresses if self._auth is not None else frozenset()

    def set_hosts(self, hosts: Iterable[str]) -> None:
        """The hosts of the backends publishing into bound sockets (IPs or names)."""
        self._hosts = frozenset(hosts)
        for host in self._hosts:
            if host not in self._resolved and not _is_ip(host):
                self._resolved[host] = frozenset()
                task = asyncio.get_running_loop().create_task(self._resolve(host))
                self._resolving.add(task)
                task.add_done_callback(self._resolving.discard)
        for host in [h for h in self._resolved if h not in self._hosts]:
            del self._resolved[host]
        self._publish()

    async def _resolve(self, host: str) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                                 type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("KV events: cannot resolve backend host %s (%s); its events are "
                        "refused until it resolves", host, exc)
            return
        if host in self._resolved:
            self._resolved[host] = frozenset(str(info[4][0]) for info in infos)
            self._publish()

    def _publish(self) -> None:
        if self._auth is None:
            return
        ips = {_canonical(h) for h in self._hosts if _is_ip(h)}
        for resolved in self._resolved.values():
            ips |= resolved
        self._auth.addresses = frozenset(ips) | self.allow_from


def _is_ip(host: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host.strip("[]"))
        return True
    return False


def _canonical(host: str) -> str:
    """The text ZAP reports for a peer (no brackets, compressed IPv6)."""
    return str(ipaddress.ip_address(host.strip("[]")))
