"""The Helm chart, rendered by the real Helm 3 binary and checked against Kubernetes' schemas.

``helm lint --strict`` and ``helm template`` run on several values sets (defaults, every
optional object on, the two examples); every rendered object and every example manifest is
validated with ``kubernetes-validate`` (strict, Kubernetes 1.33). The ServiceMonitor is a CRD
without a schema there, so it is checked structurally against the Service it scrapes. The
ConfigMap's ``config.yaml`` is fed to the router's own config parser, so the chart and the
router cannot drift apart.

Helm comes from ``make tools`` (``scripts/install-helm``, cached in ``.tools/``); when it is
missing the fixture installs it, and only when that fails do these tests skip, saying why.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from router.config import parse_config
from router.setup.kv import build_kv, wants_kv

pytestmark = pytest.mark.helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "kvrouter"
EXAMPLES = ROOT / "helm" / "examples"
HELM = ROOT / ".tools" / "helm"
K8S_VERSION = "1.33.0"
NAMESPACE = "serving"

ALL_ON = {
    "replicaCount": 3,
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
    "networkPolicy": {
        "enabled": True, "restrictEgress": True,
        "ingressFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
    },
    "grafanaDashboard": {"enabled": True},
    "serviceAccount": {"annotations": {"example.com/role": "router"}},
    "podAnnotations": {"example.com/scrape": "true"},
    "env": [{"name": "KVROUTER_LOG_LEVEL", "value": "debug"}],
    "extraVolumes": [{"name": "tokenizers", "configMap": {"name": "tiny-tokenizer"}}],
    "extraVolumeMounts": [{"name": "tokenizers", "mountPath": "/models/tiny", "readOnly": True}],
    "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "kvrouter"}},
    }],
    "config": {"discovery": {"mode": "kubernetes", "kubernetes": {"namespace": "engines",
                                                                 "label_selector": "app=vllm"}}},
}
DNS_MODE = {"config": {"discovery": {"mode": "dns", "dns": {
    "name": "vllm-headless.serving.svc.cluster.local", "port": 8000}}}}


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.exists():
        result = subprocess.run([str(ROOT / "scripts" / "install-helm")], capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0 or not HELM.exists():
            pytest.skip(f"Helm could not be installed (scripts/install-helm): {result.stderr[-500:]}")
    return HELM


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


IMAGE = {"repository": "registry.example.com/kvrouter"}


def values_file(tmp_path: Path, values: dict[str, Any] | None,
                image: dict[str, str] | None = IMAGE) -> list[str]:
    """``-f`` for ``values`` plus the required image.repository (none is published)."""
    values = dict(values or {})
    if image is not None:
        values.setdefault("image", image)
    if not values:
        return []
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def render(helm: Path, tmp_path: Path, values: dict[str, Any] | None = None,
           files: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    args = ["template", "kvrouter", str(CHART), "--namespace", NAMESPACE,
            "--kube-version", K8S_VERSION, *values_file(tmp_path, values)]
    for extra in files:
        args += ["-f", str(extra)]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def validate_all(docs: list[dict[str, Any]]) -> set[str]:
    """Strict schema validation of every object that has a schema; returns the kinds checked."""
    checked = set()
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked structurally by the caller
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.add(doc["kind"])
    return checked


def router_config(docs: list[dict[str, Any]]) -> Any:
    (configmap,) = [d for d in by_kind(docs)["ConfigMap"] if "config.yaml" in d["data"]]
    raw = yaml.safe_load(configmap["data"]["config.yaml"])
    config = parse_config(raw)
    if wants_kv(config, {}):
        build_kv(config)  # the kv_events section and tokenizer paths, as serve checks them
    return config, config.discovery


VALUE_SETS = {
    "defaults": (None, ()),
    "all-on": (ALL_ON, ()),
    "dns": (DNS_MODE, ()),
    "example-vllm": (None, (EXAMPLES / "vllm-prefix-caching" / "values.yaml",)),
    "example-prefill-decode": (None, (EXAMPLES / "prefill-decode" / "values.yaml",)),
}


@pytest.mark.parametrize("name", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_lint_strict(helm: Path, tmp_path: Path, name: str) -> None:
    values, files = VALUE_SETS[name]
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE,
            *values_file(tmp_path, values)]
    for extra in files:
        args += ["-f", str(extra)]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_every_rendered_object_is_valid_and_the_config_parses(
    helm: Path, tmp_path: Path, name: str
) -> None:
    values, files = VALUE_SETS[name]
    docs = render(helm, tmp_path, values, files)
    checked = validate_all(docs)
    assert {"Deployment", "Service", "ConfigMap"} <= checked
    config, discovery = router_config(docs)
    assert config.server.host == "0.0.0.0"
    kinds = by_kind(docs)
    (deployment,) = kinds["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == config.server.port
    sync = config.sync
    peers = [s for s in kinds["Service"] if s["spec"].get("clusterIP") == "None"]
    assert sync.enabled is bool(peers)
    assert container["args"] == ["serve", "--config", "/etc/kvrouter/config.yaml"]
    if discovery.mode == "kubernetes":
        assert discovery.kubernetes is not None and discovery.kubernetes.namespace
        assert {"Role", "RoleBinding", "ServiceAccount"} <= checked
    else:
        assert "Role" not in kinds


def test_defaults_are_hardened_and_drain_gracefully(helm: Path, tmp_path: Path) -> None:
    kinds = by_kind(render(helm, tmp_path))
    (deployment,) = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    sleep_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < sleep_s < pod["terminationGracePeriodSeconds"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["automountServiceAccountToken"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/kvrouter"]["readOnly"] is True and "/tmp" in mounts
    (role,) = kinds["Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    (binding,) = kinds["RoleBinding"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (service,) = [s for s in kinds["Service"] if s["spec"].get("clusterIP") != "None"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()
    for optional in ("ServiceMonitor", "HorizontalPodAutoscaler", "NetworkPolicy"):
        assert optional not in kinds
    assert "PodDisruptionBudget" in kinds


def test_all_optional_objects(helm: Path, tmp_path: Path) -> None:
    docs = render(helm, tmp_path, ALL_ON)
    kinds = by_kind(docs)
    (deployment,) = kinds["Deployment"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"][-1]["name"] == "tokenizers"
    assert pod["containers"][0]["volumeMounts"][-1]["mountPath"] == "/models/tiny"
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # Discovery in another namespace: the Role lives there, the binding names our account.
    role = kinds["Role"][0]
    assert role["metadata"]["namespace"] == "engines"
    assert kinds["RoleBinding"][0]["subjects"][0]["namespace"] == NAMESPACE
    # ServiceMonitor: no schema in kubernetes-validate (a CRD), so check it structurally.
    (monitor,) = kinds["ServiceMonitor"]
    (service,) = [s for s in kinds["Service"] if s["spec"].get("clusterIP") != "None"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    assert port_names == {"http"}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    (policy,) = kinds["NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 443, 6443, 8000, 5557, 5657} <= egress_ports
    # The dashboard ConfigMap carries exactly the dashboard in docs/.
    (dashboard,) = [c for c in kinds["ConfigMap"] if "kvrouter.json" in c["data"]]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["kvrouter.json"])
    assert shipped == json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    assert shipped["panels"], "the dashboard has panels"


@pytest.mark.parametrize(("values", "synced"), [
    ({"replicaCount": 1}, False),
    ({"replicaCount": 3}, True),
    ({"replicaCount": 1, "autoscaling": {"enabled": True}}, True),
    ({"replicaCount": 3, "replicaSync": {"enabled": False}}, False),
], ids=["one", "three", "autoscaled", "off"])
def test_replicas_are_wired_for_replica_sync(helm: Path, tmp_path: Path, values: dict[str, Any],
                                             synced: bool) -> None:
    values = {**values, "networkPolicy": {"enabled": True, "restrictEgress": True},
              "replicaSync": {"port": 5701, **values.get("replicaSync", {})}}
    docs = render(helm, tmp_path, values)
    validate_all(docs)
    kinds = by_kind(docs)
    config, _ = router_config(docs)
    sync = config.sync
    (deployment,) = kinds["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    peers = [s for s in kinds["Service"] if s["spec"].get("clusterIP") == "None"]
    (policy,) = kinds["NetworkPolicy"]
    ingress_ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert sync.enabled is synced
    if not synced:
        assert not peers and "sync" not in ports and "sync" not in ingress_ports
        return
    (service,) = peers
    # The replicas find each other at the headless Service's name, on the sync port.
    assert sync.dns_name == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert sync.port == ports["sync"] == service["spec"]["ports"][0]["port"] == 5701
    assert service["spec"]["ports"][0]["targetPort"] == "sync"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()
    assert "sync" in ingress_ports and 5701 in egress_ports
    # A key set in config.sync wins over what the chart wires.
    docs = render(helm, tmp_path, {**values, "config": {"sync": {"peer_timeout_s": 9.0}}})
    config, _ = router_config(docs)
    assert config.sync.peer_timeout_s == 9.0 and config.sync.port == 5701


def test_warm_start_is_wired_with_the_admin_token(helm: Path, tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "replicaCount": 3, "replicaSync": {"warmStart": True},
        "networkPolicy": {"enabled": True, "restrictEgress": True,
                          "ingressFrom": [{"namespaceSelector": {}}]},
        "config": {"server": {"admin_token": "t0ken"}}}
    docs = render(helm, tmp_path, values)
    validate_all(docs)
    config, _ = router_config(docs)
    assert config.sync.warm_start.enabled and config.sync.dns_name
    (policy,) = by_kind(docs)["NetworkPolicy"]
    router_pods = [rule for rule in policy["spec"]["ingress"] if "from" in rule
                   and any("podSelector" in f for f in rule["from"])]
    assert any(p["port"] == "http" for rule in router_pods for p in rule["ports"])
    assert any(p["port"] == 8080 for rule in policy["spec"]["egress"] for p in rule["ports"]
               if "to" in rule)
    # Without the token the siblings would refuse it: the chart says so at template time.
    del values["config"]
    result = run_helm(helm, "template", "kvrouter", str(CHART),
                      *values_file(tmp_path, values))
    assert result.returncode != 0
    assert "replicaSync.warmStart needs config.server.admin_token" in result.stderr
    # One replica: nothing to warm from, nothing wired.
    docs = render(helm, tmp_path, {**values, "replicaCount": 1})
    assert not router_config(docs)[0].sync.warm_start.enabled


def test_workers_run_one_pod_on_every_core_and_refuse_unsynced_replicas(
        helm: Path, tmp_path: Path) -> None:
    def args(docs: list[dict[str, Any]]) -> list[str]:
        (deployment,) = by_kind(docs)["Deployment"]
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    assert "--workers" not in args(render(helm, tmp_path))  # one process by default
    docs = render(helm, tmp_path, {"workers": 4, "replicaCount": 1})
    validate_all(docs)
    assert args(docs)[-2:] == ["--workers", "4"]
    assert args(render(helm, tmp_path, {"workers": 2, "replicaCount": 3,
                                        "replicaSync": {"enabled": False}}))[-2:] == [
        "--workers", "2"]
    # Workers sync only with each other: several synced pods would silently stop syncing.
    for values in ({"workers": 2}, {"workers": 2, "replicaCount": 1,
                                    "autoscaling": {"enabled": True}}):
        result = run_helm(helm, "template", "kvrouter", str(CHART),
                          *values_file(tmp_path, values))
        assert result.returncode != 0
        assert "workers > 1 with replica sync across pods" in result.stderr
        assert "replicaCount: 1" in result.stderr
    result = run_helm(helm, "template", "kvrouter", str(CHART),
                      *values_file(tmp_path, {"workers": 0}))
    assert result.returncode != 0 and "workers" in result.stderr


def test_config_change_rolls_the_pods(helm: Path, tmp_path: Path) -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        (deployment,) = by_kind(render(helm, tmp_path, values))["Deployment"]
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum(None) != checksum({"config": {"server": {"log_level": "debug"}}})


def test_chart_and_docs_carry_the_same_dashboard() -> None:
    assert (CHART / "files" / "grafana-dashboard.json").read_bytes() == (
        ROOT / "docs" / "grafana-dashboard.json").read_bytes()


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"replicaCount": 0}, "replicaCount"),
        ({"config": {"discovery": {"mode": "consul"}}}, "mode"),
        ({"config": {"discovery": {"mode": "kubernetes", "kubernetes": {"labelSelector": "x"}}}},
         "labelSelector"),
        ({"serviceMonitor": {"interval": "often"}}, "interval"),
        ({"replicas": 3}, "replicas"),
    ],
    ids=["replicas-zero", "mode", "k8s-typo", "interval", "unknown-top-level"],
)
def test_schema_refuses_bad_values(helm: Path, tmp_path: Path, values: dict[str, Any],
                                   problem: str) -> None:
    result = run_helm(helm, "template", "kvrouter", str(CHART), *values_file(tmp_path, values))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert problem in result.stderr


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"config": {"polcy": {"name": "kv_aware"}}}, "config: Additional property polcy"),
        ({"config": {"policy": {"name": "kv_awarex"}}}, "config.policy.name: config.policy.name "
                                                          "must be one of the following"),
        ({"config": {"policy": {"name": "kv_aware", "params": {"temperature": 1}}}},
         "config.policy.params: Additional property temperature"),
        ({"config": {"health": {"interval": 5}}}, "config.health: Additional property interval"),
        ({"config": {"server": {"port": "8080"}}}, "config.server.port"),
        ({"config": {"backends": [{"url": "10.0.0.1:8000"}]}}, "config.backends"),
    ],
    ids=["section-typo", "policy-name", "policy-param", "key-typo", "type", "url"],
)
def test_schema_refuses_config_typos_at_template_time(
    helm: Path, tmp_path: Path, values: dict[str, Any], problem: str
) -> None:
    """Typos inside `config` once rendered cleanly and stopped the pod at start; the chart's
    schema (generated from the router's config dataclasses) now refuses them."""
    result = run_helm(helm, "template", "kvrouter", str(CHART), *values_file(tmp_path, values))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert problem in result.stderr, result.stderr


def test_chart_schema_is_generated_from_the_router_config() -> None:
    """values.schema.json's `config` is exactly what router/config_schema.py generates: run
    scripts/chart-schema after changing a config dataclass."""
    from router.config_schema import config_schema

    shipped = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]
    assert shipped == config_schema(), "stale chart schema: run scripts/chart-schema"
    # ...and it covers every section the router parses (each is a field of Config).
    import dataclasses

    from router.config import Config

    assert set(shipped["properties"]) == {f.name for f in dataclasses.fields(Config)}


def test_image_repository_is_required_and_says_how_to_build(helm: Path, tmp_path: Path) -> None:
    result = run_helm(helm, "template", "kvrouter", str(CHART),
                      *values_file(tmp_path, None, image=None))
    assert result.returncode != 0
    assert "image.repository is required: no kvrouter image is published" in result.stderr
    assert "docker build" in result.stderr and "docs/kubernetes.md" in result.stderr


@pytest.mark.parametrize("manifest", sorted(EXAMPLES.glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_manifests_are_valid(manifest: Path) -> None:
    for doc in yaml.safe_load_all(manifest.read_text()):
        if doc is None or manifest.name == "values.yaml":
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        pod = doc["spec"]["template"]
        annotations = pod["metadata"].get("annotations", {})
        assert annotations["kvrouter.io/kv-events-endpoint"].startswith("tcp://*:"), (
            "engines must bind their publisher so every router replica can subscribe")
        args = " ".join(pod["spec"]["containers"][0]["args"])
        assert "--enable-prefix-caching" in args and "enable_kv_cache_events" in args


def test_examples_discover_their_own_engines(helm: Path, tmp_path: Path) -> None:
    """The example values' selector matches the example engines' pod labels, and not the
    router's own pods."""
    from fake_kube import selector_matches

    for example, manifest in (("vllm-prefix-caching", "vllm.yaml"),
                              ("prefill-decode", "vllm-pd.yaml")):
        docs = render(helm, tmp_path, None, (EXAMPLES / example / "values.yaml",))
        _, discovery = router_config(docs)
        selector = discovery.kubernetes.label_selector
        engines = [d for d in yaml.safe_load_all((EXAMPLES / example / manifest).read_text())]
        assert engines and all(selector_matches(selector, e["spec"]["template"]["metadata"]["labels"])
                               for e in engines)
        (router,) = by_kind(docs)["Deployment"]
        assert not selector_matches(selector, router["spec"]["template"]["metadata"]["labels"])
    roles = {e["spec"]["template"]["metadata"]["labels"]["kvrouter.io/role"] for e in
             yaml.safe_load_all((EXAMPLES / "prefill-decode" / "vllm-pd.yaml").read_text())}
    assert roles == {"prefill", "decode"}
