"""The ``disaggregation`` config section, as values: the decider's parameters
(``policies.disaggregation.DisaggregationParams``) and the router's own settings for split
requests (``DisaggConfig``), side by side in one flat YAML mapping; and wrapping the configured
policy in the decider.

``parse_disaggregation`` runs once, when ``router.config.root`` loads the file, and splits the
mapping by key into a ``DisaggregationConfig``; ``router.pd.serving`` reads its ``serving``
half, ``wrap_policy`` its ``decider`` half. Errors are one line naming the key path
(``disaggregation.min_uncached_tokens: expected an integer``).

Imports only ``policies`` (the config room's rule).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from policies.disaggregation import Disaggregated, DisaggregationParams
from policies.params import ParamError, parse_params
from policies.types import Policy

__all__ = [
    "DEFAULT_BOOTSTRAP_PORT",
    "DisaggConfig",
    "DisaggregationConfig",
    "parse_disaggregation",
    "wrap_policy",
]

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's bootstrap server (router.pd.sglang)


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    prefill_timeout_s: float = 120.0
    max_prefill_attempts: int = 2
    max_decode_attempts: int = 2
    fallback_to_local: bool = True
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    bootstrap_hosts: dict[str, str] = field(default_factory=dict)
    bootstrap_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prefill_timeout_s <= 0:
            raise ValueError("prefill_timeout_s must be > 0")
        if self.max_prefill_attempts < 1 or self.max_decode_attempts < 1:
            raise ValueError("max_prefill_attempts and max_decode_attempts must be >= 1")


@dataclass(frozen=True, slots=True)
class DisaggregationConfig:
    """The parsed section: the router's settings and the decider's parameters."""

    serving: DisaggConfig = field(default_factory=DisaggConfig)
    decider: DisaggregationParams = field(default_factory=DisaggregationParams)


def parse_disaggregation(raw: object) -> DisaggregationConfig:
    """The ``disaggregation`` section (``None``: absent, the defaults); raises ParamError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamError("disaggregation", "expected a mapping")
    decider_keys = {f.name for f in dataclasses.fields(DisaggregationParams)}
    router_keys = {f.name for f in dataclasses.fields(DisaggConfig)}
    for key in raw:
        if key not in decider_keys | router_keys:
            raise ParamError(f"disaggregation.{key}", "unknown key (known: "
                             f"{', '.join(sorted(decider_keys | router_keys))})")
    serving = parse_params(
        DisaggConfig, {k: v for k, v in raw.items() if k in router_keys}, "disaggregation")
    decider = parse_params(
        DisaggregationParams, {k: v for k, v in raw.items() if k in decider_keys},
        "disaggregation")
    return DisaggregationConfig(serving, decider)


def wrap_policy(policy: Policy, section: DisaggregationConfig, rng: random.Random) -> Policy:
    """The configured policy inside the prefill/decode decider (a no-op in mixed pools)."""
    return Disaggregated(policy, section.decider, rng)
