"""Discovery's shared pieces (the diffing set, endpoint and pod parsing, the config section)
and discovery driving a real router: pods found through the fake Kubernetes API serve
requests, and a pod that leaves is drained (in-flight streams finish, new requests avoid it,
its index entries are purged)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_backend import FakeBackend, RouterHandle, wait_for
from fake_kube import FakeKube, make_pod
from prometheus_client import CollectorRegistry

from policies.kv.index import PrefixIndex
from policies.types import Role
from router.config import ConfigError, parse_config
from router.config.discovery import parse_discovery
from router.discovery.backend_set import (
    BackendSet,
    DiscoveredBackend,
    DiscoveryMetrics,
    EventSource,
    event_sources_from_json,
    resolve_endpoint,
)
from router.discovery.k8s import KubernetesParams, PodError, backend_from_pod
from router.pool import BackendPool
from router.setup.discovery import PoolSink, discovery_background


class Sink:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def backend_added(self, backend: DiscoveredBackend) -> None:
        self.log.append(("added", backend.url))

    def backend_updated(self, backend: DiscoveredBackend) -> None:
        self.log.append(("updated", backend.url))

    def backend_removed(self, backend_id: str) -> None:
        self.log.append(("removed", backend_id))


def test_backend_set_diffs_snapshots_into_changes_and_metrics() -> None:
    sink, registry = Sink(), CollectorRegistry()
    backends = BackendSet(sink, DiscoveryMetrics(registry), "test")
    a, b = DiscoveredBackend("http://a:1"), DiscoveredBackend("http://b:1")
    assert not backends.synced
    backends.replace([a, b])
    backends.replace([a, b])  # no change, no events
    backends.replace([DiscoveredBackend("http://a:1", role=Role.DECODE)])
    backends.replace([DiscoveredBackend("http://a:1", role=Role.DECODE, origin="x"),
                      DiscoveredBackend("http://a:1", origin="duplicate")])
    assert sink.log == [("added", "http://a:1"), ("added", "http://b:1"),
                        ("removed", "http://b:1"), ("updated", "http://a:1"),
                        ("updated", "http://a:1")]
    assert backends.backends["http://a:1"].origin == "x"
    assert registry.get_sample_value("kvrouter_discovered_backends") == 1
    assert registry.get_sample_value("kvrouter_discovery_events_total", {"kind": "updated"}) == 2


@pytest.mark.parametrize(
    ("endpoint", "host", "expected"),
    [
        ("tcp://*:5557", "10.0.0.7", ("tcp://10.0.0.7:5557", True)),
        ("tcp://0.0.0.0:41002", "10.0.0.7", ("tcp://10.0.0.7:41002", True)),
        ("tcp://[::]:5557", "fd00::7", ("tcp://[fd00::7]:5557", True)),
        ("tcp://10.9.9.9:5557", "10.0.0.7", ("tcp://10.9.9.9:5557", False)),
        ("ipc:///tmp/kv", "10.0.0.7", ("ipc:///tmp/kv", True)),
    ],
    ids=["star", "resolved-any", "ipv6", "engine-connects", "ipc"],
)
def test_resolve_endpoint(endpoint: str, host: str, expected: tuple[str, bool]) -> None:
    assert resolve_endpoint(endpoint, host) == expected


def test_event_sources_from_json_accepts_both_vllm_shapes_and_names_bad_entries() -> None:
    entries = [
        {"data_parallel_rank": 1, "endpoint": "tcp://0.0.0.0:41002", "replay_endpoint": None,
         "topic": "kv"},
        {"data_parallel_rank": 0, "endpoint": "tcp://0.0.0.0:41001",
         "replay_endpoint": "tcp://0.0.0.0:41003", "topic": "kv"},
        {"data_parallel_rank": 2, "endpoint": None},
    ]
    expected = (
        EventSource("tcp://10.0.0.7:41001", "tcp://10.0.0.7:41003", "kv", 0, True),
        EventSource("tcp://10.0.0.7:41002", None, "kv", 1, True),
    )
    assert event_sources_from_json(entries, "10.0.0.7") == expected
    assert event_sources_from_json({"sources": entries}, "10.0.0.7") == expected
    with pytest.raises(ValueError, match=r"kv_event_sources\[0\].data_parallel_rank"):
        event_sources_from_json([{"endpoint": "tcp://*:1", "data_parallel_rank": "x"}], "h")
    with pytest.raises(ValueError, match="expected a JSON array"):
        event_sources_from_json("nope", "h")


@pytest.mark.parametrize(
    ("labels", "annotations", "problem"),
    [
        ({"kvrouter.io/role": "leader"}, {}, "kvrouter.io/role='leader'"),
        ({}, {"kvrouter.io/engine": "trtllm"}, "kvrouter.io/engine='trtllm'"),
        ({}, {"kvrouter.io/port": "http"}, "kvrouter.io/port='http'"),
        ({}, {"kvrouter.io/kv-events-endpoint": "tcp://*"}, "ZMQ endpoint has no port"),
        ({}, {"kvrouter.io/kv-events-endpoint": "tcp://*:1",
              "kvrouter.io/data-parallel-size": "0"}, "data-parallel-size='0'"),
    ],
    ids=["role", "engine", "port", "endpoint", "dp-size"],
)
def test_bad_pod_metadata_is_named(labels: dict[str, str], annotations: dict[str, str],
                                   problem: str) -> None:
    with pytest.raises(PodError, match=problem.replace("*", r"\*")):
        backend_from_pod(make_pod("p", "10.0.0.1", labels=labels, annotations=annotations),
                         KubernetesParams())


def test_annotations_win_over_labels_and_ipv6_pods_get_brackets() -> None:
    pod = make_pod("p", "fd00::5", labels={"kvrouter.io/role": "prefill"},
                   annotations={"kvrouter.io/role": "decode", "kvrouter.io/model": "org/m"})
    backend = backend_from_pod(pod, KubernetesParams(port=9000, ask_event_sources=True))
    assert backend is not None
    assert backend.url == "http://[fd00::5]:9000"
    assert backend.role is Role.DECODE and backend.models == ("org/m",)
    assert backend.ask_event_sources


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mode": "consul"}, "discovery.mode: expected one of static, dns, kubernetes"),
        ({"mode": "dns"}, "discovery.dns: required when mode is dns"),
        ({"mode": "dns", "dns": {"name": "x", "port": "80"}}, "discovery.dns.port: expected an integer"),
        ({"mode": "kubernetes", "kubernetes": {"namespce": "x"}}, "discovery.kubernetes.namespce: unknown key"),
        ({"mode": "kubernetes", "kubernetes": {"role": "x"}},
         "discovery.kubernetes.role: expected one of mixed, prefill, decode"),
    ],
    ids=["mode", "dns-missing", "dns-port", "k8s-typo", "k8s-role"],
)
def test_discovery_section_errors_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_discovery(raw)


def test_kubernetes_mode_outside_a_cluster_is_a_config_error() -> None:
    config = parse_config({"discovery": {"mode": "kubernetes"}})
    with pytest.raises(ConfigError, match=r"discovery\.kubernetes: not running in a cluster"):
        discovery_background(config, {})
    assert discovery_background(parse_config({}), {}) == []


def test_pool_sink_applies_changes_tells_event_sources_and_spares_static_backends() -> None:
    pool = BackendPool()
    pool.add("http://static:1")
    index = PrefixIndex()
    told: list[tuple[str, tuple[EventSource, ...]]] = []
    sink = PoolSink(pool, index, lambda backend_id, sources: told.append((backend_id, sources)))
    rank0 = EventSource("tcp://10.0.0.1:5557", data_parallel_rank=0)
    sink.backend_added(DiscoveredBackend("http://10.0.0.1:8000", role=Role.PREFILL,
                                         models=("m",), event_sources=(rank0,)))
    backend = pool.get("http://10.0.0.1:8000")
    assert backend is not None and backend.role is Role.PREFILL and backend.models() == ("m",)
    # Kept as the engine was configured (it binds): ingestion connects to the pod's host.
    assert backend.kv_events_endpoint == "tcp://*:5557"
    sink.backend_updated(DiscoveredBackend("http://10.0.0.1:8000", role=Role.DECODE,
                                           event_sources=(rank0,)))
    assert backend.role is Role.DECODE and backend.models() == ()
    index.record_dispatch("http://10.0.0.1:8000", [7, 8], now_s=0.0, ttl_s=1e9)
    sink.backend_removed("http://10.0.0.1:8000")
    assert pool.get("http://10.0.0.1:8000") is None
    assert index.backend_entries("http://10.0.0.1:8000") == 0
    # Same sources on update are not repeated; leaving says ().
    assert told == [("http://10.0.0.1:8000", (rank0,)), ("http://10.0.0.1:8000", ())]
    # A discovered URL that is also configured statically is left alone both ways.
    sink.backend_added(DiscoveredBackend("http://static:1", role=Role.DECODE))
    sink.backend_removed("http://static:1")
    static = pool.get("http://static:1")
    assert static is not None and static.role is Role.MIXED




async def test_router_serves_discovered_pods_and_drains_one_that_leaves(
    tmp_path: Path,
    start_backend: Callable[..., Awaitable[FakeBackend]],
    start_router: Callable[..., Awaitable[RouterHandle]],
    http: aiohttp.ClientSession,
) -> None:
    kube = FakeKube(token="t")
    await kube.start()
    try:
        slow = await start_backend(name="slow", chunks=6, chunk_delay_s=0.15)
        fast = await start_backend(name="fast")
        for name, backend in (("slow", slow), ("fast", fast)):
            port = backend.url.rsplit(":", 1)[1]
            await kube.apply(make_pod(name, "127.0.0.1", labels={"app": "vllm"}, annotations={
                "kvrouter.io/port": port, "kvrouter.io/model": "tiny"}))
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            f"current-context: c\ncontexts: [{{name: c, context: {{cluster: k, user: u}}}}]\n"
            f"clusters: [{{name: k, cluster: {{server: '{kube.url}'}}}}]\n"
            f"users: [{{name: u, user: {{token: t}}}}]\n"
        )
        config = parse_config({
            "discovery": {"mode": "kubernetes", "kubernetes": {
                "kubeconfig": str(kubeconfig), "label_selector": "app=vllm",
                "ask_event_sources": False}},
            "policy": {"name": "round_robin"},
        })
        index = PrefixIndex()
        router = await start_router(config, index=index,
                                    background=discovery_background(config, {}))
        pool = router.state.pool
        await wait_for(lambda: {b.url for b in pool} == {slow.url, fast.url}, "pods in the pool")
        index.record_dispatch(slow.url, [1, 2, 3], now_s=0.0, ttl_s=1e9)
        assert index.backend_entries(slow.url) == 3

        body = {"model": "tiny", "prompt": "hello", "stream": True, "max_tokens": 6}
        while True:  # round robin: find the request that lands on the slow backend
            resp = await http.post(f"{router.url}/v1/completions", json=body)
            first = await resp.content.readline()
            if b"slow" in first:
                break
            await resp.read()
        await kube.delete("slow")
        await wait_for(lambda: {b.url for b in pool} == {fast.url}, "slow pod drained")
        assert index.backend_entries(slow.url) == 0
        # The stream that was already on the leaving backend finishes.
        rest = await resp.read()
        assert rest.rstrip().endswith(b"data: [DONE]") and b"slow-t5" in rest
        for _ in range(4):
            async with http.post(f"{router.url}/v1/completions",
                                 json={"model": "tiny", "prompt": "x"}) as again:
                assert again.status == 200
                assert (await again.json())["id"] == "cmpl-fast"
        metrics = await (await http.get(f"{router.url}/metrics")).text()
        assert 'kvrouter_discovery_events_total{kind="removed"} 1.0' in metrics
        assert "kvrouter_discovered_backends 1.0" in metrics
    finally:
        await kube.stop()
