"""DNS discovery: A records through the loop's resolver (``localhost``), SRV records against a
small DNS server on 127.0.0.1 speaking the real wire format (dnspython builds the answers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from fake_backend import wait_for
from prometheus_client import CollectorRegistry

from router.discovery.backend_set import BackendSet, DiscoveredBackend, DiscoveryMetrics
from router.discovery.dns import DnsDiscovery, DnsParams


class Sink:
    def __init__(self) -> None:
        self.backends: dict[str, DiscoveredBackend] = {}
        self.log: list[tuple[str, str]] = []

    def backend_added(self, backend: DiscoveredBackend) -> None:
        self.backends[backend.url] = backend
        self.log.append(("added", backend.url))

    def backend_updated(self, backend: DiscoveredBackend) -> None:
        self.backends[backend.url] = backend
        self.log.append(("updated", backend.url))

    def backend_removed(self, backend_id: str) -> None:
        del self.backends[backend_id]
        self.log.append(("removed", backend_id))


class FakeDns(asyncio.DatagramProtocol):
    """Answers from ``records`` ({(name, type): [rdata text]}); ``servfail`` fails everything."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.servfail = False
        self.queries = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        query = dns.message.from_wire(data)
        answer = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if self.servfail:
            answer.set_rcode(dns.rcode.SERVFAIL)
        elif (name, rdtype) in self.records:
            answer.answer.append(
                dns.rrset.from_text_list(name, 5, "IN", rdtype, self.records[(name, rdtype)])
            )
        elif not any(n == name for n, _ in self.records):
            answer.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(answer.to_wire(), addr)


@pytest.fixture
async def fake_dns() -> AsyncIterator[tuple[FakeDns, str]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(FakeDns, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield protocol, f"127.0.0.1:{port}"
    transport.close()


def harness(**params: object) -> tuple[DnsDiscovery, Sink, CollectorRegistry, BackendSet]:
    sink, registry = Sink(), CollectorRegistry()
    metrics = DiscoveryMetrics(registry)
    backends = BackendSet(sink, metrics, "dns")
    return DnsDiscovery(DnsParams(**params), backends, metrics), sink, registry, backends  # type: ignore[arg-type]


def count(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("kvrouter_discovery_events_total", {"kind": kind}) or 0




async def test_a_records_of_localhost_through_the_loop_resolver() -> None:
    discovery, sink, registry, backends = harness(name="localhost", port=8123, role="decode",
                                                  models=("tiny",))
    async with aiohttp.ClientSession() as session:
        await discovery.refresh(session)
    assert list(sink.backends) == ["http://127.0.0.1:8123"]
    backend = sink.backends["http://127.0.0.1:8123"]
    assert backend.role == "decode" and backend.models == ("tiny",)
    assert backend.origin == "dns:localhost"
    assert registry.get_sample_value("kvrouter_discovered_backends") == 1
    assert backends.synced


async def test_a_name_that_does_not_exist_empties_the_set() -> None:
    discovery, sink, registry, _ = harness(name="no-such-backend.invalid", port=8000)
    async with aiohttp.ClientSession() as session:
        await discovery.refresh(session)
    assert sink.backends == {} and discovery.resolutions == 1
    assert count(registry, "resolve_error") == 0


async def test_srv_records_follow_the_service_and_survive_dns_failures(
    fake_dns: tuple[FakeDns, str],
) -> None:
    server, address = fake_dns
    srv_name = "_http._tcp.vllm.serving.svc.cluster.local."
    server.records = {
        (srv_name, "SRV"): ["0 50 8000 a.vllm.test.", "0 50 8001 b.vllm.test."],
        ("a.vllm.test.", "A"): ["127.0.0.2"],
        ("b.vllm.test.", "A"): ["127.0.0.3"],
    }
    discovery, sink, registry, _ = harness(
        name=srv_name, srv=True, nameserver=address, interval_s=0.02, timeout_s=2.0
    )
    task = asyncio.create_task(discovery.run())
    try:
        await wait_for(lambda: set(sink.backends) == {"http://127.0.0.2:8000",
                                                       "http://127.0.0.3:8001"}, "two pods")
        # A pod goes away and another appears (re-resolved on the interval).
        server.records[(srv_name, "SRV")] = ["0 50 8000 a.vllm.test.", "0 50 8000 c.vllm.test."]
        server.records[("c.vllm.test.", "A")] = ["127.0.0.4"]
        await wait_for(lambda: set(sink.backends) == {"http://127.0.0.2:8000",
                                                       "http://127.0.0.4:8000"}, "churn")
        # The DNS server fails: keep what we have, count the failures.
        server.servfail = True
        before = server.queries
        await wait_for(lambda: count(registry, "resolve_error") >= 2, "failures counted")
        assert server.queries > before
        assert set(sink.backends) == {"http://127.0.0.2:8000", "http://127.0.0.4:8000"}
        server.servfail = False
        # No ready pod: the SRV name has no records any more, and the set empties.
        del server.records[(srv_name, "SRV")]
        await wait_for(lambda: sink.backends == {}, "all pods gone")
        assert ("removed", "http://127.0.0.3:8001") in sink.log
        assert count(registry, "added") == 3 and count(registry, "removed") == 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "name is required"),
        ({"name": "x", "port": 0}, "port must be"),
        ({"name": "x", "address_family": "ipx"}, "address_family"),
        ({"name": "x", "role": "leader"}, "role must be one of"),
        ({"name": "x", "nameserver": "10.0.0.1"}, "host:port"),
    ],
    ids=["no-name", "port", "family", "role", "nameserver"],
)
def test_bad_params_are_refused(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DnsParams(**params)  # type: ignore[arg-type]
