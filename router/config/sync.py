"""The ``sync:`` config section: replica sync between router replicas.

    sync:
      enabled: true
      port: 5601                       # this replica's PUB socket: tcp://*:5601
      peers: [tcp://10.0.0.2:5601]     # static peer endpoints, and/or:
      dns_name: kvrouter-peers.serving.svc.cluster.local   # headless Service: each A record
      kubernetes_label_selector: app.kubernetes.io/name=kvrouter   # or pods with a label
      warm_start:                      # load a sibling's index snapshot before reporting ready
        enabled: true
        urls: []                       # siblings' base URLs; empty: the peers above, at http_port
        http_port: 0                   # the peers' HTTP port (0: this replica's server.port)
        timeout_s: 10.0                # no sibling answered by then: start cold (counted)
        catch_up_timeout_s: 30.0       # ready anyway once the streams took this long

Peers' addresses come from one of the discovery mechanisms the router already has (a static
list, the A records of a headless Service, or the Kubernetes API with a label selector); each
is a PUB socket this replica subscribes to. Only those addresses (and ``allow_from``) may
connect to this replica's own PUB socket. Parsed once at start into ``SyncConfig``; errors
name the key (``sync.port: must be in 1..65535``). Imports only ``policies`` (the config room
sits at the bottom of the router); ``router.sync`` runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from policies.params import ParamError as ConfigError
from policies.params import parse_params
from policies.replica_sync import SyncParams

__all__ = ["SyncConfig", "WarmStartConfig", "parse_sync"]

# tcp:// and ipc:// are ZeroMQ endpoints; unix:// is a Unix stream socket driven by the event
# loop (router.sync.unix), for replicas of one host.
_SCHEMES = ("tcp://", "ipc://", "unix://")


@dataclass(frozen=True, slots=True)
class WarmStartConfig:
    """Warm start (docs/scale-out.md): fetch a sibling's ``GET /admin/index/snapshot`` with
    ``server.admin_token``, then replay the engines' streams from the snapshot's positions."""

    enabled: bool = False
    urls: tuple[str, ...] = ()  # siblings' base URLs, tried in order; empty: the sync peers
    http_port: int = 0  # the peers' HTTP port when taken from the peers (0: server.port)
    timeout_s: float = 10.0  # whole fetch, every sibling tried (again) within it
    catch_up_timeout_s: float = 30.0  # longest the restored streams may keep /ready at 503


@dataclass(frozen=True, slots=True)
class SyncConfig:
    enabled: bool = False
    port: int = 5601  # the PUB socket's TCP port, and the port of every discovered peer
    bind_host: str = "*"
    bind: str = ""  # a full endpoint instead of tcp://bind_host:port (unix://... for --workers)
    peers: tuple[str, ...] = ()  # static peer endpoints (tcp://HOST:PORT, ipc:// or unix://PATH)
    dns_name: str = ""  # a headless Service's name: each A/AAAA record is a peer at `port`
    kubernetes_label_selector: str = ""  # pods with this label are peers at `port`
    kubernetes_namespace: str = ""  # default: the pod's own namespace
    kubeconfig: str = ""  # outside a cluster (tests, development)
    discover_interval_s: float = 10.0
    allow_from: tuple[str, ...] = ()  # extra IPs allowed to subscribe
    heartbeat_interval_s: float = 1.0
    # Own messages queued within this window leave as one ZeroMQ message: one send here and
    # one wake-up at each peer for the lot, instead of one per loop turn. 0: every loop turn.
    flush_interval_s: float = 0.002
    peer_timeout_s: float = 5.0  # a peer silent this long is dropped with its in-flight share
    # Retired: sync no longer holds peers' requests one by one (their states replace each
    # other), so nothing can be left over to expire. Accepted and ignored, so that configs
    # and Helm values of earlier versions still load.
    max_in_flight_s: float = 900.0
    # Ship each dispatch's prompt text to the peers: None (the default) when the policy reads
    # it (character matching: sglang_cache_aware, consistent_hash); kv_aware does not.
    send_prompt_text: bool | None = None
    # Send each flush window's messages as one frame (router.sync.wire.encode_batch): a fifth
    # of the ZeroMQ cost and a cheaper decode. Replicas before it cannot read it, so it is off
    # for pods until every replica runs a version that reads it; `serve --workers` turns it on
    # (its workers are one version).
    batch_frames: bool = False
    replica_id: str = ""  # default: hostname, process id and a random suffix
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)

    def params(self) -> SyncParams:
        return SyncParams(self.peer_timeout_s, self.heartbeat_interval_s)

    @property
    def endpoint(self) -> str:
        return self.bind or f"tcp://{self.bind_host}:{self.port}"


def parse_sync(raw: object) -> SyncConfig:
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError("sync", "expected a mapping")
    section = parse_params(SyncConfig, raw, "sync")
    if not 0 < section.port < 65536:
        raise ConfigError("sync.port", "must be in 1..65535")
    if section.bind and not section.bind.startswith(_SCHEMES):
        raise ConfigError("sync.bind", "expected tcp://HOST:PORT, ipc://PATH or unix://PATH")
    unix = section.bind.startswith("unix://")
    for i, peer in enumerate(section.peers):
        if not peer.startswith(_SCHEMES):
            raise ConfigError(f"sync.peers[{i}]", "expected tcp://HOST:PORT, ipc://PATH or "
                              f"unix://PATH, got {peer!r}")
        if peer.startswith("unix://") != unix:
            raise ConfigError(f"sync.peers[{i}]", "unix:// peers go with a unix:// bind, and "
                              f"only with one (one transport per replica), got {peer!r}")
    if unix and (section.dns_name or section.kubernetes_label_selector):
        raise ConfigError("sync.bind", "unix:// is for replicas on one host (serve --workers): "
                          "not with dns_name or kubernetes_label_selector")
    if section.discover_interval_s <= 0:
        raise ConfigError("sync.discover_interval_s", "must be > 0")
    if not 0 <= section.flush_interval_s < section.heartbeat_interval_s:
        raise ConfigError("sync.flush_interval_s", "must be >= 0 and below heartbeat_interval_s")
    warm = section.warm_start
    for i, url in enumerate(warm.urls):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"sync.warm_start.urls[{i}]", f"expected an http(s):// URL, got {url!r}")
    if not 0 <= warm.http_port < 65536:
        raise ConfigError("sync.warm_start.http_port", "must be in 0..65535")
    for name in ("timeout_s", "catch_up_timeout_s"):
        if not getattr(warm, name) > 0:
            raise ConfigError(f"sync.warm_start.{name}", "must be > 0")
    if warm.enabled and not warm.urls and not (section.peers or section.dns_name
                                               or section.kubernetes_label_selector):
        raise ConfigError("sync.warm_start.urls", "warm start needs siblings: list urls, or "
                          "peers / dns_name / kubernetes_label_selector under sync")
    try:
        section.params()
    except ValueError as exc:
        raise ConfigError("sync.peer_timeout_s", str(exc)) from None
    return section
