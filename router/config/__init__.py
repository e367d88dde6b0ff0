"""The config room: the router's configuration file, one YAML shape, validated at start-up
into frozen dataclasses, and nothing else (no I/O but reading the file, no other ``router``
room: every room reads its config from here, so this room sits at the bottom).

``root`` holds ``Config`` and the loader (``load_config``, ``parse_config``, ``apply_env``) with
the core sections (``server``, ``upstream``, ``backends``, ``health``, ``retries``, ``policy``,
``models``; see ``config.example.yaml``, documented line by line). Each room's own section has
a module here named after it: ``kv_events``, ``discovery``, ``disaggregation``. Every section is
parsed ONCE, by ``parse_config``, into its frozen dataclass (Enums for closed sets of strings)
kept in the ``Config`` field of the same name; consumers take that typed value and never see
the raw mapping. Parsing goes through ``policies.params.parse_params``, so every error is ONE
line naming the key path (``backends[1].url: expected a string``,
``discovery.kubernetes.label_selector: expected a string``); any other top-level key is an
error.

Adding a section (say ``sync``):

1. ``router/config/sync.py``: a frozen slotted dataclass ``SyncConfig`` (defaults in one place,
   units in names; Enums for closed sets) and ``parse_sync(raw: object) -> SyncConfig``, i.e.
   ``parse_params(SyncConfig, raw, "sync")`` plus any range checks raising
   ``ParamError("sync.<key>", ...)``. It imports only ``policies``.
2. ``root.py``: a field ``sync: SyncConfig = field(default_factory=SyncConfig)`` on ``Config``
   (that alone makes ``sync`` a known top-level key) and ``sync=parse_sync(raw.get("sync"))``
   in ``parse_config``. The room that uses it reads ``config.sync``.
3. ``router/config_schema.py``: ``"sync": dataclass_schema(SyncConfig)``, then run
   ``scripts/chart-schema`` so the Helm chart's values schema knows it; a commented line in
   ``config.example.yaml``; bad values in ``tests/test_config_sections.py``.
"""

from router.config.root import (
    BackendConfig,
    Config,
    ConfigError,
    EventLoop,
    HealthConfig,
    LogLevel,
    ModelConfig,
    PolicyConfig,
    RetryConfig,
    ServerConfig,
    UpstreamConfig,
    apply_env,
    load_config,
    parse_config,
    parse_section,
)

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
