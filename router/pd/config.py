"""The ``disaggregation`` config section: the decider's parameters
(``policies.disaggregation.DisaggregationParams``) and the router's own settings for split
requests (``DisaggConfig``), and wrapping the configured policy in the decider.

Must not import ``router.proxy``, ``router.app`` or ``simulator``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from policies.disaggregation import DisaggregationParams, wrap
from policies.params import parse_params
from policies.types import Policy
from router.config import Config, ConfigError, parse_section
from router.pd import sglang

__all__ = ["DisaggConfig", "check_config", "parse_disaggregation", "wrap_policy"]


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    prefill_timeout_s: float = 120.0
    max_prefill_attempts: int = 2
    max_decode_attempts: int = 2
    fallback_to_local: bool = True
    bootstrap_port: int = sglang.DEFAULT_BOOTSTRAP_PORT
    bootstrap_hosts: dict[str, str] = field(default_factory=dict)
    bootstrap_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prefill_timeout_s <= 0:
            raise ValueError("prefill_timeout_s must be > 0")
        if self.max_prefill_attempts < 1 or self.max_decode_attempts < 1:
            raise ValueError("max_prefill_attempts and max_decode_attempts must be >= 1")


def parse_disaggregation(raw: object) -> tuple[DisaggConfig, dict[str, object]]:
    """(router settings, decider parameters) of the ``disaggregation`` section."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("disaggregation", "expected a mapping")
    decider_keys = {f.name for f in dataclasses.fields(DisaggregationParams)}
    router_keys = {f.name for f in dataclasses.fields(DisaggConfig)}
    for key in raw:
        if key not in decider_keys | router_keys:
            raise ConfigError(f"disaggregation.{key}", "unknown key (known: "
                              f"{', '.join(sorted(decider_keys | router_keys))})")
    settings = parse_section(
        DisaggConfig, {k: v for k, v in raw.items() if k in router_keys}, "disaggregation")
    return settings, {k: v for k, v in raw.items() if k in decider_keys}


def wrap_policy(policy: Policy, config: Config, rng: random.Random) -> Policy:
    """The configured policy inside the prefill/decode decider (a no-op in mixed pools)."""
    _, decider = parse_disaggregation(config.extensions.get("disaggregation"))
    return wrap(policy, decider, rng)


def check_config(config: Config) -> None:
    """Raise ConfigError for a bad ``disaggregation`` section (for start-up)."""
    _, decider = parse_disaggregation(config.extensions.get("disaggregation"))
    parse_params(DisaggregationParams, decider, "disaggregation")
