"""``Config`` and the loader: the core sections (``server``, ``upstream``, ``backends``,
``health``, ``retries``, ``policy``, ``models``) and one field per room's section, each parsed
ONCE by ``parse_config`` (the room's docstring, ``router/config/__init__.py``, says how to add a
section). Environment overrides (``KVROUTER_PORT``, ``KVROUTER_LOG_LEVEL``) are applied in
``apply_env`` and nowhere else.

Imports only ``policies`` and its sibling section modules (``router.config.*``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import yaml

from policies.params import ParamError, parse_params
from policies.registry import build_policy
from policies.types import EngineKind, Role
from router.config.disaggregation import DisaggregationConfig, parse_disaggregation
from router.config.discovery import DiscoveryConfig, parse_discovery
from router.config.kv_events import KvEventsConfig, parse_kv_events
from router.config.sync import SyncConfig, parse_sync

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "EventLoop",
    "HealthConfig",
    "LogLevel",
    "ModelConfig",
    "PolicyConfig",
    "RetryConfig",
    "ServerConfig",
    "UpstreamConfig",
    "apply_env",
    "load_config",
    "parse_config",
    "parse_section",
]

ConfigError = ParamError
"""Raised for any invalid config; ``str(error)`` is the one line to print."""

T = TypeVar("T")


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class EventLoop(StrEnum):
    AUTO = "auto"
    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"


LOG_LEVELS = tuple(level.value for level in LogLevel)
EVENT_LOOPS = tuple(loop.value for loop in EventLoop)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: LogLevel = LogLevel.INFO
    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = 60.0
    max_buffered_body_bytes: int = 256 * 1024 * 1024
    session_header: str = "x-session-id"
    admin_token: str | None = None
    engine_signals_max_age_s: float = 15.0
    event_loop: EventLoop = EventLoop.AUTO


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 600.0
    read_idle_timeout_s: float = 600.0
    max_connections: int = 0
    # Idle keep-alive connections opened to each healthy backend after each health probe, so
    # the first requests after start-up (or after a quiet spell longer than the backend's
    # keep-alive timeout) need no connect: a burst's connects complete only after the event
    # loop has handled the burst's other requests (bench/README.md, "Pre-opened connections").
    preconnect: int = 2


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str
    role: Role = Role.MIXED
    engine: EngineKind = EngineKind.VLLM
    models: tuple[str, ...] = ()
    kv_events_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    path: str = "/health"
    discover_models: bool = True
    ejection_consecutive_failures: int = 5
    ejection_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 3
    backoff_initial_s: float = 0.05
    backoff_multiplier: float = 1.5
    backoff_max_s: float = 1.0
    jitter_ratio: float = 0.2


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    name: str = "kv_aware"
    params: dict[str, object] = field(default_factory=dict)
    seed: int | None = None
    max_hold_s: float = 30.0  # longest a request the policy defers waits in the router


@dataclass(frozen=True, slots=True)
class ModelConfig:
    tokenizer: str | None = None
    block_size: int = 16


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    backends: tuple[BackendConfig, ...] = ()
    health: HealthConfig = HealthConfig()
    retries: RetryConfig = RetryConfig()
    policy: PolicyConfig = PolicyConfig()
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    kv_events: KvEventsConfig | None = None  # None: the section is absent (KV plumbing off)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    disaggregation: DisaggregationConfig = field(default_factory=DisaggregationConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)


def parse_section(cls: type[T], raw: object, path: str) -> T:
    """Parse one section into its dataclass; ``None`` gives the defaults."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(path, "expected a mapping")
    return parse_params(cls, raw, path)


def _require(ok: bool, path: str, problem: str) -> None:
    if not ok:
        raise ConfigError(path, problem)


def _check_positive(section: object, path: str, names: tuple[str, ...], allow_zero: bool) -> None:
    for name in names:
        value = getattr(section, name)
        ok = value >= 0 if allow_zero else value > 0
        _require(ok, f"{path}.{name}", "must be >= 0" if allow_zero else "must be > 0")


def _parse_backend(raw: object, path: str) -> BackendConfig:
    if isinstance(raw, str):
        raw = {"url": raw}
    _require(isinstance(raw, Mapping), path, "expected a mapping or a URL string")
    assert isinstance(raw, Mapping)
    _require("url" in raw, f"{path}.url", "required")
    backend = parse_section(BackendConfig, raw, path)
    url = backend.url.rstrip("/")
    _require(
        url.startswith(("http://", "https://")) and len(url.split("://", 1)[1]) > 0,
        f"{path}.url",
        f"expected an http:// or https:// URL, got {backend.url!r}",
    )
    # The classic OpenAI base-URL mistake: the router appends /v1/... itself, so .../v1 would
    # make every health check and request 404.
    path_part = url.split("://", 1)[1].partition("/")[2]
    _require(
        not (path_part == "v1" or path_part.endswith("/v1") or "/v1/" in f"/{path_part}/"),
        f"{path}.url",
        f"{backend.url!r} includes /v1: give the server's root (e.g. "
        f"{url[: url.rfind('/v1')] or url}), the router adds /v1/... itself",
    )
    return dataclasses.replace(backend, url=url)


def _parse_models(raw: object) -> dict[str, ModelConfig]:
    if raw is None:
        return {}
    _require(isinstance(raw, Mapping), "models", "expected a mapping of model name to settings")
    assert isinstance(raw, Mapping)
    models = {}
    for name, item in raw.items():
        model = parse_section(ModelConfig, item, f"models.{name}")
        _require(model.block_size > 0, f"models.{name}.block_size", "must be > 0")
        models[str(name)] = model
    return models


def parse_config(raw: object) -> Config:
    """Validate plain data (as loaded from YAML) into a Config; raises ConfigError."""
    if raw is None:
        raw = {}
    _require(isinstance(raw, Mapping), "<root>", "expected a mapping of sections")
    assert isinstance(raw, Mapping)
    known = {f.name for f in dataclasses.fields(Config)}
    for key in raw:
        _require(key in known, str(key), f"unknown section (known: {', '.join(sorted(known))})")
    server = parse_section(ServerConfig, _lower_log_level(raw.get("server")), "server")
    _require(0 <= server.port <= 65535, "server.port", "expected 0..65535")
    _check_positive(server, "server", ("max_body_bytes", "engine_signals_max_age_s",
                                       "body_timeout_s", "max_buffered_body_bytes"), False)
    _require(server.max_buffered_body_bytes >= server.max_body_bytes,
             "server.max_buffered_body_bytes",
             f"must be >= server.max_body_bytes ({server.max_body_bytes})")
    _require(bool(server.session_header), "server.session_header", "must not be empty")
    upstream = parse_section(UpstreamConfig, raw.get("upstream"), "upstream")
    _check_positive(upstream, "upstream",
                    ("connect_timeout_s", "first_byte_timeout_s", "read_idle_timeout_s"), False)
    _check_positive(upstream, "upstream", ("max_connections", "preconnect"), True)
    raw_backends = raw.get("backends") or []
    _require(isinstance(raw_backends, list), "backends", "expected a list")
    backends = tuple(_parse_backend(b, f"backends[{i}]") for i, b in enumerate(raw_backends))
    seen: set[str] = set()
    for i, backend in enumerate(backends):
        _require(backend.url not in seen, f"backends[{i}].url", f"duplicate {backend.url}")
        seen.add(backend.url)
    health = parse_section(HealthConfig, raw.get("health"), "health")
    _check_positive(health, "health", ("interval_s", "timeout_s", "unhealthy_threshold",
                                       "healthy_threshold", "ejection_consecutive_failures",
                                       "ejection_s"), False)
    retries = parse_section(RetryConfig, raw.get("retries"), "retries")
    _check_positive(retries, "retries", ("max_attempts", "backoff_multiplier"), False)
    _check_positive(retries, "retries", ("backoff_initial_s", "backoff_max_s", "jitter_ratio"),
                    True)
    _require(retries.jitter_ratio <= 1, "retries.jitter_ratio", "must be <= 1")
    policy = parse_section(PolicyConfig, raw.get("policy"), "policy")
    # Building the policy once here turns a bad name or parameter into a start-up error that
    # names its key path, instead of a failure on the first request.
    build_policy(policy.name, policy.params, random.Random(0))
    sync = parse_sync(raw.get("sync"))
    _require(not sync.warm_start.enabled or server.admin_token is not None,
             "sync.warm_start.enabled",
             "warm start fetches snapshots with server.admin_token: set it (the same on every "
             "replica)")
    kv_events = parse_kv_events(raw.get("kv_events"))
    _require(not sync.warm_start.enabled or kv_events is None or kv_events.enabled,
             "sync.warm_start.enabled",
             "warm start restores the index that KV events keep current: it needs "
             "kv_events.enabled true")
    return Config(
        server=server,
        upstream=upstream,
        backends=backends,
        health=health,
        retries=retries,
        policy=policy,
        models=_parse_models(raw.get("models")),
        kv_events=kv_events,
        discovery=parse_discovery(raw.get("discovery")),
        disaggregation=parse_disaggregation(raw.get("disaggregation")),
        sync=sync,
    )


def _lower_log_level(raw: object) -> object:
    # Log levels are accepted in any case (INFO, Info), as the logging module does.
    if isinstance(raw, Mapping) and isinstance(raw.get("log_level"), str):
        return {**raw, "log_level": raw["log_level"].lower()}
    return raw


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file; raises ConfigError (also for unreadable or bad YAML)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"invalid YAML{where}") from None
    return parse_config(raw)


def apply_env(config: Config, environ: Mapping[str, str]) -> Config:
    """The one place environment variables are read into config: port and log level."""
    server = config.server
    if "KVROUTER_PORT" in environ:
        value = environ["KVROUTER_PORT"]
        _require(value.isdigit() and int(value) <= 65535, "KVROUTER_PORT",
                 f"expected a port number, got {value!r}")
        server = dataclasses.replace(server, port=int(value))
    if "KVROUTER_LOG_LEVEL" in environ:
        level = environ["KVROUTER_LOG_LEVEL"].lower()
        _require(level in LOG_LEVELS, "KVROUTER_LOG_LEVEL", f"expected one of {', '.join(LOG_LEVELS)}")
        server = dataclasses.replace(server, log_level=LogLevel(level))
    return dataclasses.replace(config, server=server)
