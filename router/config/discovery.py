"""The ``discovery`` config section, as values: which source finds backends, and its parameters.

    discovery:
      mode: kubernetes          # static (only the `backends` list) | dns | kubernetes
      kubernetes: {namespace: serving, label_selector: "app=vllm", port: 8000}
      dns: {name: vllm-headless.serving.svc.cluster.local, port: 8000}
      seed: null                # the Kubernetes watch's backoff jitter (null: from the OS)

``parse_discovery`` runs once, when ``router.config.root`` loads the file; the discovery modules
(``dns``, ``k8s``) and ``router.setup.discovery`` take the parsed ``DiscoveryConfig``. Only the
subsection of the chosen mode is read (the other one is ignored, as it always was). Errors are
one line naming the key path (``discovery.kubernetes.label_selector: expected a string``).

Imports only ``policies`` (the config room's rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from policies.params import ParamError, parse_params
from policies.types import EngineKind, Role

__all__ = [
    "AddressFamily",
    "DiscoveryConfig",
    "DiscoveryMode",
    "DnsParams",
    "KubernetesParams",
    "parse_discovery",
]


class DiscoveryMode(StrEnum):
    STATIC = "static"
    DNS = "dns"
    KUBERNETES = "kubernetes"


class AddressFamily(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class DnsParams:
    name: str = ""
    port: int = 8000
    srv: bool = False
    interval_s: float = 10.0
    timeout_s: float = 5.0
    address_family: AddressFamily = AddressFamily.IPV4
    nameserver: str = ""
    role: Role = Role.MIXED
    engine: EngineKind = EngineKind.VLLM
    models: tuple[str, ...] = ()
    ask_event_sources: bool = False

    def __post_init__(self) -> None:
        # The enum checks repeat the parser's for values built in code rather than from YAML.
        if not self.name:
            raise ValueError("name is required (the headless Service's DNS name)")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be > 0")
        if self.address_family not in {f.value for f in AddressFamily}:
            raise ValueError(f"address_family must be one of {', '.join(AddressFamily)}")
        if self.role not in {r.value for r in Role}:
            raise ValueError(f"role must be one of {', '.join(r.value for r in Role)}")
        if self.engine not in {e.value for e in EngineKind}:
            raise ValueError(f"engine must be one of {', '.join(e.value for e in EngineKind)}")
        if self.nameserver:
            host, _, port = self.nameserver.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("nameserver must be host:port")


@dataclass(frozen=True, slots=True)
class KubernetesParams:
    namespace: str = ""
    label_selector: str = ""
    port: int = 8000
    role: Role = Role.MIXED
    engine: EngineKind = EngineKind.VLLM
    ask_event_sources: bool = False
    kubeconfig: str = ""
    context: str = ""
    watch_timeout_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")
        if self.role not in {r.value for r in Role}:
            raise ValueError(f"role must be one of {', '.join(r.value for r in Role)}")
        if self.engine not in {e.value for e in EngineKind}:
            raise ValueError(f"engine must be one of {', '.join(e.value for e in EngineKind)}")
        if self.watch_timeout_s < 1:
            raise ValueError("watch_timeout_s must be >= 1")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """The parsed section: ``dns`` is set exactly in dns mode, ``kubernetes`` in kubernetes."""

    mode: DiscoveryMode = DiscoveryMode.STATIC
    dns: DnsParams | None = None
    kubernetes: KubernetesParams | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class _RawSection:
    # The subsections stay mappings here: only the chosen mode's is parsed, below.
    mode: DiscoveryMode = DiscoveryMode.STATIC
    dns: dict[str, object] | None = None
    kubernetes: dict[str, object] | None = None
    seed: int | None = None


def parse_discovery(raw: object) -> DiscoveryConfig:
    """The ``discovery`` section (``None``: absent, static); raises ParamError."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ParamError("discovery", "expected a mapping")
    section = parse_params(_RawSection, raw, "discovery")
    if section.mode is DiscoveryMode.DNS:
        if section.dns is None:
            raise ParamError("discovery.dns", "required when mode is dns")
        return DiscoveryConfig(section.mode, dns=parse_params(DnsParams, section.dns,
                                                              "discovery.dns"),
                               seed=section.seed)
    if section.mode is DiscoveryMode.KUBERNETES:
        params = parse_params(KubernetesParams, section.kubernetes, "discovery.kubernetes")
        return DiscoveryConfig(section.mode, kubernetes=params, seed=section.seed)
    return DiscoveryConfig()
