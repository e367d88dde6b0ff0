"""The router's config file as a JSON Schema, generated from the dataclasses that parse it.

The Helm chart's ``values.schema.json`` embeds this under ``config`` so that ``helm install``
refuses a typo (``config.polcy``, ``policy.name: kv_awarex``, ``health.interval: 5``) at
template time instead of rendering a ConfigMap that stops the pod at start.
``scripts/chart-schema`` writes it into the chart; ``tests/test_helm.py`` fails when the file
and this function disagree, so the chart and the router cannot drift apart.

What it checks is what the parsers check by key and type: every section and key (unknown ones
are refused), JSON types from the type hints, the enumerations (policy names, roles, engines,
log levels, discovery modes), and each policy's own parameters. Ranges and cross-key rules stay
with the router, which still validates everything at start. Not imported at run time.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import types
import typing
from typing import Any

from policies.disaggregation import DisaggregationParams
from policies.registry import POLICY_MODULES, policy_names
from router.config import (
    BackendConfig,
    HealthConfig,
    ModelConfig,
    PolicyConfig,
    RetryConfig,
    ServerConfig,
    UpstreamConfig,
)
from router.config.disaggregation import DisaggConfig
from router.config.discovery import DiscoveryMode, DnsParams, KubernetesParams
from router.config.kv_events import KvEventsConfig

__all__ = ["config_schema", "dataclass_schema"]

_URL = {"type": "string", "pattern": "^https?://"}


def _type_schema(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a) for a in args if a is not type(None)]
        nullable = type(None) in args
        if len(options) == 1 and "type" in options[0] and set(options[0]) == {"type"}:
            kinds = options[0]["type"]
            kinds = kinds if isinstance(kinds, list) else [kinds]
            return {"type": [*kinds, "null"] if nullable else kinds}
        return {"anyOf": [*options, {"type": "null"}] if nullable else options}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [str(member.value) for member in hint]}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return dataclass_schema(hint, required=tuple(
            f.name for f in dataclasses.fields(hint)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if origin in (tuple, list):
        item = args[0] if args else Any
        return {"type": "array", **({"items": _type_schema(item)} if item is not Any else {})}
    if origin in (dict, typing.Mapping) or hint in (dict, typing.Mapping):
        value = args[1] if len(args) == 2 else Any
        schema: dict[str, Any] = {"type": "object"}
        if value is not Any and value is not object:
            schema["additionalProperties"] = _type_schema(value)
        return schema
    return {}  # object, Any or a type the parsers check themselves


def dataclass_schema(cls: type, overrides: dict[str, dict[str, Any]] | None = None,
                     required: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object schema with one property per field (typed from its hint), nothing else."""
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        properties[f.name] = (overrides or {}).get(f.name) or _type_schema(hints[f.name])
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                              "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _params_class(policy: str) -> type | None:
    module = importlib.import_module(POLICY_MODULES[policy])
    for name in getattr(module, "__all__", ()):
        value = getattr(module, name)
        if name.endswith("Params") and dataclasses.is_dataclass(value):
            return value  # type: ignore[return-value]
    return None


def _policy_schema() -> dict[str, Any]:
    names = policy_names()
    per_policy = []
    for name in names:
        cls = _params_class(name)
        params = (dataclass_schema(cls) if cls is not None
                  else {"type": "object", "additionalProperties": False})
        per_policy.append({"if": {"properties": {"name": {"const": name}}},
                           "then": {"properties": {"params": params}}})
    # From the dataclass, like the other sections, so that no key the router reads (e.g.
    # max_hold_s) is refused by the chart.
    schema = dataclass_schema(PolicyConfig, {"name": {"type": "string", "enum": names},
                                             "params": {"type": "object"}})
    schema["allOf"] = per_policy
    return schema


def config_schema() -> dict[str, Any]:
    """JSON Schema (draft-07) of the router's config file."""
    port = {"type": "integer", "minimum": 0, "maximum": 65535}
    backend = dataclass_schema(BackendConfig, {"url": _URL}, required=("url",))
    disaggregation = dataclass_schema(DisaggConfig)
    disaggregation["properties"].update(dataclass_schema(DisaggregationParams)["properties"])
    discovery = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "mode": _type_schema(DiscoveryMode),
            "seed": {"type": ["integer", "null"]},
            "dns": dataclass_schema(DnsParams, {"port": port}, required=("name",)),
            "kubernetes": dataclass_schema(KubernetesParams, {"port": port}),
        },
    }
    return {
        "type": "object",
        "description": "The router's config file (config.example.yaml shape), generated from "
                       "router/config_schema.py by scripts/chart-schema; the router validates "
                       "every key again at start.",
        "additionalProperties": False,
        "properties": {
            "server": dataclass_schema(ServerConfig, {"port": port}),
            "upstream": dataclass_schema(UpstreamConfig),
            "backends": {"type": "array", "items": {"anyOf": [_URL, backend]}},
            "health": dataclass_schema(HealthConfig),
            "retries": dataclass_schema(RetryConfig),
            "policy": _policy_schema(),
            "models": {"type": "object", "additionalProperties": dataclass_schema(ModelConfig)},
            "kv_events": dataclass_schema(KvEventsConfig),
            "discovery": discovery,
            "disaggregation": disaggregation,
        },
    }
