"""Kubernetes discovery against the fake API server: pod lifecycles, 410 Gone, dropped watches."""

from __future__ import annotations

import asyncio
import base64
import random
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fake_backend import wait_for
from fake_kube import FakeKube, make_pod
from prometheus_client import CollectorRegistry

from policies.types import Role
from router.discovery.backend_set import (
    BackendSet,
    DiscoveredBackend,
    DiscoveryMetrics,
    EventSource,
)
from router.discovery.k8s import KubernetesDiscovery, KubernetesParams
from router.discovery.kube_client import (
    KubeConfig,
    KubeConfigError,
    in_cluster_config,
    kubeconfig_config,
)

SELECTOR = "app=vllm,tier in (serving, canary)"
LABELS = {"app": "vllm", "tier": "serving"}


class RecordingSink:
    def __init__(self) -> None:
        self.backends: dict[str, DiscoveredBackend] = {}
        self.log: list[tuple[str, str]] = []

    def backend_added(self, backend: DiscoveredBackend) -> None:
        assert backend.url not in self.backends
        self.backends[backend.url] = backend
        self.log.append(("added", backend.url))

    def backend_updated(self, backend: DiscoveredBackend) -> None:
        assert backend.url in self.backends
        self.backends[backend.url] = backend
        self.log.append(("updated", backend.url))

    def backend_removed(self, backend_id: str) -> None:
        del self.backends[backend_id]
        self.log.append(("removed", backend_id))




class Harness:
    def __init__(self, kube: FakeKube, **params: Any) -> None:
        self.kube = kube
        self.sink = RecordingSink()
        self.registry = CollectorRegistry()
        metrics = DiscoveryMetrics(self.registry)
        self.set = BackendSet(self.sink, metrics, "k8s")
        config = params.pop("config", None) or KubeConfig(server=kube.url, token="test-token")
        defaults: dict[str, Any] = {
            "label_selector": SELECTOR, "ask_event_sources": False,
            "backoff_initial_s": 0.01, "backoff_max_s": 0.05,
        }
        self.discovery = KubernetesDiscovery(
            config, KubernetesParams(**{**defaults, **params}), self.set, metrics,
            random.Random(7),
        )
        self.task: asyncio.Task[None] | None = None

    def count(self, kind: str) -> float:
        return self.registry.get_sample_value("kvrouter_discovery_events_total", {"kind": kind}) or 0

    @property
    def urls(self) -> set[str]:
        return set(self.sink.backends)

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.discovery.run())
        await wait_for(lambda: self.set.synced, "first list")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # surface a crash of the loop
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    fake = FakeKube()
    await fake.start()
    yield fake
    await fake.stop()


def set_ready(ready: bool) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["status"]["conditions"][1]["status"] = "True" if ready else "False"
    return change


def set_meta(table: str, key: str, value: str | None) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        if value is None:
            pod["metadata"][table].pop(key, None)
        else:
            pod["metadata"][table][key] = value
    return change


async def test_pod_lifecycle_add_ready_relabel_notready_delete(kube: FakeKube) -> None:
    a, b = "http://127.0.0.2:8000", "http://127.0.0.3:8000"
    async with Harness(kube) as h:
        assert h.urls == set()
        await kube.apply(make_pod("a", "127.0.0.2", ready=False, labels=LABELS))
        await kube.apply(make_pod("b", "127.0.0.3", ready=True, labels=LABELS))
        await wait_for(lambda: h.urls == {b}, "ready pod b only")
        await kube.patch("a", set_ready(True))
        await wait_for(lambda: h.urls == {a, b}, "pod a ready")
        assert h.sink.backends[a].role is Role.MIXED

        await kube.patch("a", set_meta("labels", "kvrouter.io/role", "prefill"))
        await wait_for(lambda: h.sink.backends[a].role is Role.PREFILL, "role label")
        await kube.patch("a", set_meta("annotations", "kvrouter.io/model", "org/m-1, m-2"))
        await wait_for(lambda: h.sink.backends[a].models == ("org/m-1", "m-2"), "model")
        assert h.sink.log.count(("updated", a)) == 2

        await kube.patch("a", set_ready(False))
        await wait_for(lambda: h.urls == {b}, "pod a not ready")
        await kube.patch("b", set_meta("labels", "app", "other"))  # leaves the selector
        await wait_for(lambda: h.urls == set(), "pod b relabelled away")
        await kube.patch("b", set_meta("labels", "app", "vllm"))
        await wait_for(lambda: h.urls == {b}, "pod b back")
        await kube.patch("b", set_meta("annotations", "kvrouter.io/port", "9000"))
        await wait_for(lambda: h.urls == {"http://127.0.0.3:9000"}, "port moved")
        await kube.delete("b")
        await wait_for(lambda: h.urls == set(), "pod b deleted")
        await kube.patch("a", set_ready(True))
        await wait_for(lambda: h.urls == {a}, "pod a ready again")

        assert h.sink.log == [
            ("added", b), ("added", a), ("updated", a), ("updated", a), ("removed", a),
            ("removed", b), ("added", b), ("removed", b), ("added", "http://127.0.0.3:9000"),
            ("removed", "http://127.0.0.3:9000"), ("added", a),
        ]
        assert h.count("added") == 5 and h.count("removed") == 4 and h.count("updated") == 2
        assert h.registry.get_sample_value("kvrouter_discovered_backends") == 1
        assert h.discovery.lists == 1 and h.count("relist") == 0


async def test_initial_list_honours_selector_namespace_and_readiness(kube: FakeKube) -> None:
    await kube.apply(make_pod("ok", "127.0.0.2", labels=LABELS))
    await kube.apply(make_pod("canary", "127.0.0.3", labels={"app": "vllm", "tier": "canary"}))
    await kube.apply(make_pod("batch", "127.0.0.4", labels={"app": "vllm", "tier": "batch"}))
    await kube.apply(make_pod("noip", None, labels=LABELS))
    await kube.apply(make_pod("elsewhere", "127.0.0.5", labels=LABELS, namespace="other"))
    terminating = make_pod("terminating", "127.0.0.6", labels=LABELS)
    terminating["metadata"]["deletionTimestamp"] = "2026-11-27T10:00:00Z"
    await kube.apply(terminating)
    async with Harness(kube) as h:
        assert h.urls == {"http://127.0.0.2:8000", "http://127.0.0.3:8000"}
        assert h.sink.backends["http://127.0.0.2:8000"].origin == "k8s:default/ok"
        path, query = kube.requests[0]
        assert path == "/api/v1/namespaces/default/pods" and query["labelSelector"] == SELECTOR


async def test_terminating_pod_is_drained_before_it_turns_unready(kube: FakeKube) -> None:
    await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
    async with Harness(kube) as h:
        assert h.urls == {"http://127.0.0.2:8000"}

        def terminate(pod: dict[str, Any]) -> None:
            pod["metadata"]["deletionTimestamp"] = "2026-11-27T10:00:00Z"

        await kube.patch("a", terminate)
        await wait_for(lambda: h.urls == set(), "terminating pod drained")


@pytest.mark.parametrize("gone_as_event", [False, True], ids=["http-410", "error-event-410"])
async def test_gone_relists_and_catches_up_with_missed_changes(gone_as_event: bool) -> None:
    kube = FakeKube(gone_as_event=gone_as_event)
    await kube.start()
    try:
        await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
        async with Harness(kube) as h:
            assert h.urls == {"http://127.0.0.2:8000"}
            # Cut the watch and keep the router out while the cluster moves on and the
            # history it would resume from is compacted away.
            kube.fail_next = 10**6
            seen = len(kube.requests)
            kube.drop_watches()
            await wait_for(lambda: len(kube.requests) > seen, "a failed reconnect")
            await kube.delete("a")
            await kube.apply(make_pod("b", "127.0.0.3", labels=LABELS))
            kube.compact()
            kube.fail_next = 0
            await wait_for(lambda: h.urls == {"http://127.0.0.3:8000"}, "state after relist")
            assert h.discovery.lists == 2
            assert h.count("relist") == 1
            assert h.count("watch_error") >= 1
            assert h.sink.log[-2:] == [
                ("removed", "http://127.0.0.2:8000"), ("added", "http://127.0.0.3:8000"),
            ]
            # And it keeps watching from the new list's version.
            await kube.apply(make_pod("c", "127.0.0.4", labels=LABELS))
            await wait_for(lambda: len(h.urls) == 2, "pod c after relist")
    finally:
        await kube.stop()


async def test_dropped_watch_resumes_from_last_version_without_relisting(kube: FakeKube) -> None:
    await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
    async with Harness(kube) as h:
        await kube.apply(make_pod("b", "127.0.0.3", labels=LABELS))
        await wait_for(lambda: len(h.urls) == 2, "pod b")
        version = str(kube.version)
        for _ in range(3):
            kube.drop_watches()
            await wait_for(lambda: kube.watch_count == 1, "watch reopened")
        await kube.apply(make_pod("c", "127.0.0.4", labels=LABELS))
        await wait_for(lambda: len(h.urls) == 3, "pod c after reconnects")
        watches = [q for _, q in kube.requests if q.get("watch") == "1"]
        assert len(watches) >= 4
        assert all(q["resourceVersion"] == version for q in watches[1:4])
        assert all(q["allowWatchBookmarks"] == "true" for q in watches)
        assert h.discovery.lists == 1 and h.count("relist") == 0


async def test_bookmark_moves_the_version_past_changes_we_do_not_watch(kube: FakeKube) -> None:
    await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
    async with Harness(kube) as h:
        await wait_for(lambda: kube.watch_count == 1, "watch open")
        # Churn outside our selector moves the version on without sending us anything.
        for i in range(3):
            await kube.apply(make_pod(f"other-{i}", "127.0.0.9", labels={"app": "db"}))
        await kube.bookmark()
        await wait_for(lambda: h.discovery.resource_version == str(kube.version), "bookmark")
        kube.compact()
        kube.drop_watches()
        await wait_for(lambda: kube.watch_count == 1, "watch reopened")
        await kube.apply(make_pod("b", "127.0.0.3", labels=LABELS))
        await wait_for(lambda: len(h.urls) == 2, "pod b")
        assert h.discovery.lists == 1 and h.count("relist") == 0


async def test_api_errors_back_off_with_jitter_and_recover(kube: FakeKube) -> None:
    await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
    kube.fail_next = 4
    async with Harness(kube) as h:
        assert h.urls == {"http://127.0.0.2:8000"}
        assert h.count("watch_error") == 4
    delays = [h.discovery._backoff_s(n) for n in range(1, 8)]
    assert all(0.005 <= d <= 0.05 for d in delays)
    assert len(set(delays)) == len(delays), "jitter from the injected RNG"


async def test_wrong_token_is_an_error_until_fixed() -> None:
    kube = FakeKube(token="right")
    await kube.start()
    try:
        await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
        h = Harness(kube, config=KubeConfig(server=kube.url, token="wrong"))
        h.task = asyncio.create_task(h.discovery.run())
        await wait_for(lambda: h.count("watch_error") >= 2, "401s counted")
        assert not h.set.synced
        kube.token = "wrong"
        await wait_for(lambda: h.urls == {"http://127.0.0.2:8000"}, "recovered")
        await h.__aexit__()
    finally:
        await kube.stop()


async def test_bad_annotations_skip_the_pod_and_are_counted(kube: FakeKube) -> None:
    await kube.apply(make_pod("bad-role", "127.0.0.2", labels={**LABELS, "kvrouter.io/role": "x"}))
    await kube.apply(
        make_pod("bad-port", "127.0.0.3", labels=LABELS, annotations={"kvrouter.io/port": "99999"})
    )
    await kube.apply(make_pod("good", "127.0.0.4", labels=LABELS))
    async with Harness(kube) as h:
        assert h.urls == {"http://127.0.0.4:8000"}
        assert h.count("invalid_backend") == 2
        await kube.patch("bad-role", set_meta("labels", "kvrouter.io/role", "decode"))
        await wait_for(lambda: "http://127.0.0.2:8000" in h.urls, "fixed pod joins")
        assert h.sink.backends["http://127.0.0.2:8000"].role is Role.DECODE


async def test_data_parallel_ranks_become_separate_event_sources(kube: FakeKube) -> None:
    annotations = {
        "kvrouter.io/kv-events-endpoint": "tcp://*:5557",
        "kvrouter.io/kv-events-replay-endpoint": "tcp://*:5657",
        "kvrouter.io/kv-events-topic": "kv@a",
        "kvrouter.io/data-parallel-size": "2",
        "kvrouter.io/engine": "sglang",
    }
    await kube.apply(make_pod("a", "10.1.2.3", labels=LABELS, annotations=annotations))
    async with Harness(kube, ask_event_sources=True) as h:
        backend = h.sink.backends["http://10.1.2.3:8000"]
        assert backend.engine == "sglang" and not backend.ask_event_sources
        assert backend.event_sources == (
            EventSource("tcp://10.1.2.3:5557", "tcp://10.1.2.3:5657", "kv@a", 0, True),
            EventSource("tcp://10.1.2.3:5558", "tcp://10.1.2.3:5658", "kv@a", 1, True),
        )


async def test_event_sources_are_asked_from_the_pod_once(kube: FakeKube) -> None:
    asked: list[str] = []

    async def sources(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response([
            {"data_parallel_rank": 1, "endpoint": "tcp://*:6001", "replay_endpoint": "tcp://*:6101",
             "topic": ""},
            {"data_parallel_rank": 0, "endpoint": "tcp://*:6000", "replay_endpoint": None,
             "topic": ""},
        ])

    app = web.Application()
    app.router.add_get("/kv_event_sources", sources)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        pod = make_pod("a", "127.0.0.1", labels=LABELS, annotations={"kvrouter.io/port": str(port)})
        await kube.apply(pod)
        await kube.apply(make_pod("silent", "127.0.0.1", labels=LABELS,
                                  annotations={"kvrouter.io/port": "1"}))
        async with Harness(kube, ask_event_sources=True) as h:
            url = f"http://127.0.0.1:{port}"
            assert [s.endpoint for s in h.sink.backends[url].event_sources] == [
                "tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001",
            ]
            assert h.sink.backends[url].event_sources[1].replay_endpoint == "tcp://127.0.0.1:6101"
            # The pod that does not answer joins without sources, counted.
            assert h.sink.backends["http://127.0.0.1:1"].ask_event_sources
            assert h.count("event_sources_error") == 1
            await kube.patch("a", set_meta("labels", "kvrouter.io/role", "decode"))
            await wait_for(lambda: h.sink.backends[url].role is Role.DECODE, "relabel")
            assert len(h.sink.backends[url].event_sources) == 2
            assert asked == ["/kv_event_sources"]
    finally:
        await runner.cleanup()


def test_in_cluster_config_reads_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "ca.crt").write_text("not checked here")
    (tmp_path / "namespace").write_text("serving\n")
    config = in_cluster_config(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "6443"}, tmp_path
    )
    assert config.server == "https://10.96.0.1:6443"
    assert config.token_path == tmp_path / "token" and config.namespace == "serving"
    assert config.ca_path == tmp_path / "ca.crt"
    with pytest.raises(KubeConfigError, match="not running in a cluster"):
        in_cluster_config({}, tmp_path / "missing")


KUBECONFIG = """
apiVersion: v1
kind: Config
current-context: dev
contexts:
- name: dev
  context: {cluster: c1, user: u1, namespace: serving}
- name: certs
  context: {cluster: c1, user: u2}
clusters:
- name: c1
  cluster: {server: "SERVER", certificate-authority-data: CADATA}
users:
- name: u1
  user: {tokenFile: token.txt}
- name: u2
  user: {client-certificate-data: AAAA, client-key-data: BBBB}
"""


async def test_kubeconfig_current_context_drives_discovery(tmp_path: Path) -> None:
    kube = FakeKube(token="file-token")
    await kube.start()
    try:
        await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS, namespace="serving"))
        path = tmp_path / "config"
        ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----").decode()
        path.write_text(KUBECONFIG.replace("SERVER", kube.url).replace("CADATA", ca))
        (tmp_path / "token.txt").write_text("file-token\n")
        config = kubeconfig_config(path)
        assert config.namespace == "serving" and config.ca_data == "-----BEGIN CERTIFICATE-----"
        with pytest.raises(KubeConfigError, match="client-certificate-data"):
            kubeconfig_config(path, context="certs")
        with pytest.raises(KubeConfigError, match="no context named 'nope'"):
            kubeconfig_config(path, context="nope")
        async with Harness(kube, config=config) as h:
            assert h.urls == {"http://127.0.0.2:8000"}
            assert kube.requests[0][0] == "/api/v1/namespaces/serving/pods"
    finally:
        await kube.stop()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed: cannot make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return key, cert


async def test_https_api_server_verified_with_the_given_ca(certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    kube = FakeKube()
    await kube.start(ssl_context=tls)
    try:
        assert kube.url.startswith("https://")
        await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
        config = KubeConfig(server=kube.url, token="test-token", ca_path=cert)
        async with Harness(kube, config=config) as h:
            assert h.urls == {"http://127.0.0.2:8000"}
        # Without the CA the same server is refused.
        untrusted = Harness(kube, config=KubeConfig(server=kube.url, token="test-token"))
        untrusted.task = asyncio.create_task(untrusted.discovery.run())
        await wait_for(lambda: untrusted.count("watch_error") >= 1, "TLS failure counted")
        assert not untrusted.set.synced
        await untrusted.__aexit__()
    finally:
        await kube.stop()


async def test_gone_straight_after_listing_backs_off_instead_of_hammering(kube: FakeKube) -> None:
    await kube.apply(make_pod("a", "127.0.0.2", labels=LABELS))
    h = Harness(kube)
    delays: list[int] = []
    backoff = h.discovery._backoff_s

    def recording(failures: int) -> float:
        delays.append(failures)
        return backoff(failures)

    h.discovery._backoff_s = recording  # type: ignore[method-assign]
    kube.compacted_below = 10**9  # every watch is 410 Gone, whatever version it asks for
    h.task = asyncio.create_task(h.discovery.run())
    await wait_for(lambda: h.discovery.lists >= 5, "repeated lists")
    await h.__aexit__()
    assert h.urls == {"http://127.0.0.2:8000"}
    # The first 410 relists at once; each further one right after a list backs off, growing.
    assert len(delays) >= h.discovery.lists - 2 >= 3
    assert delays[:3] == [1, 2, 3]
