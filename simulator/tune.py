"""Offline weight tuning for the kv_aware policy: seeded random search in the simulator.

Trial 0 is always the policy's defaults, so the winner is never worse than the defaults on the
trace it was tuned on (it may be on another: tune on a representative trace, check on a second
one). Each other trial draws every searched parameter from ``SEARCH_SPACE`` (log-uniform for
scales, uniform for ratios) with a ``random.Random(seed)``; the same seed gives the same trials.
Parameters the policy does not have (an older or newer ``KvAwareParams``) are skipped.
Objectives: minimise ``ttft_p99_s`` (default), ``ttft_p50_s``, ``e2e_p99_s`` or ``imbalance``, or maximise
``goodput_rps`` or ``hit_rate``. Must not import ``router``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "OBJECTIVES",
    "SEARCH_SPACE",
    "Verdict",
    "best_trial",
    "draw_trials",
    "params_yaml",
    "verdict",
]

# name -> (kind, low, high); "scale" multiplies the default (log-uniform), "log" and "uniform"
# are absolute ranges.
SEARCH_SPACE: dict[str, tuple[str, float, float]] = {
    "linear_s_per_token": ("scale", 0.5, 2.0),
    "attention_s_per_token_pair": ("scale", 0.25, 4.0),
    "decode_s_per_context_token": ("scale", 0.25, 4.0),
    "temperature_s": ("log", 0.0005, 0.05),
    "temperature_ratio": ("uniform", 0.0, 0.2),
    "kv_full_wait_s": ("uniform", 0.0, 4.0),
    "kv_knee_ratio": ("uniform", 0.5, 0.95),
    # Across the capacity edge (issue 12): what a prefill costs the fleet, placement memory,
    # the recent-dispatch overlay and late binding.
    "stall_ratio": ("uniform", 0.0, 2.0),
    "fleet_work_ratio": ("uniform", 0.0, 6.0),
    "busy_power": ("uniform", 1.0, 4.0),
    "home_credit_ratio": ("uniform", 0.0, 2.0),
    "duplicate_ratio": ("uniform", 0.0, 2.0),
    "cache_full_knee_ratio": ("uniform", 0.5, 0.95),
    "recent_ttl_s": ("uniform", 0.0, 2.0),
    "hold_kv_ratio": ("uniform", 0.2, 1.0),
    "hold_queue_s": ("log", 0.05, 2.0),
    "partition_ratio": ("uniform", 0.0, 2.0),
    "work_floor_ratio": ("uniform", 0.0, 1.0),
    "copy_cutoff_t": ("uniform", 0.0, 6.0),
}

OBJECTIVES: dict[str, int] = {
    # +1: lower is better, -1: higher is better.
    "ttft_p99_s": 1,
    "ttft_p50_s": 1,
    "e2e_p99_s": 1,
    "imbalance": 1,
    "goodput_rps": -1,
    "hit_rate": -1,
}


def _defaults(policy: str) -> dict[str, Any]:
    import importlib

    from policies.registry import POLICY_MODULES

    module = importlib.import_module(POLICY_MODULES[policy])
    params_cls = next(
        value
        for name, value in vars(module).items()
        if name.endswith("Params") and dataclasses.is_dataclass(value)
    )
    return {f.name: f.default for f in dataclasses.fields(params_cls)}


def draw_trials(trials: int, seed: int, policy: str = "kv_aware") -> list[dict[str, Any]]:
    """``trials`` parameter sets; the first is ``{}`` (the defaults)."""
    defaults = _defaults(policy)
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [{}]
    for _ in range(max(trials - 1, 0)):
        params: dict[str, Any] = {}
        for name, (kind, low, high) in SEARCH_SPACE.items():
            if name not in defaults:
                continue
            if kind == "scale":
                params[name] = float(defaults[name]) * math.exp(
                    rng.uniform(math.log(low), math.log(high))
                )
            elif kind == "log":
                params[name] = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                params[name] = rng.uniform(low, high)
            params[name] = float(f"{params[name]:.4g}")
        out.append(params)
    return out


def best_trial(results: Sequence[Mapping[str, Any]], objective: str) -> int:
    """Index of the best result (ties: the earlier trial, so the defaults win a tie)."""
    sign = OBJECTIVES[objective]

    def key(i: int) -> tuple[float, int]:
        value = results[i].get(objective)
        bad = value is None or (isinstance(value, float) and math.isnan(value))
        return (math.inf if bad else sign * float(value), i)  # type: ignore[arg-type]

    return min(range(len(results)), key=key)


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the best trial really beats the defaults: its gain, as a share of the defaults'
    objective (positive = better), on the tuning seed and on a second seed."""

    improved: bool
    gain_ratio: float
    second_gain_ratio: float

    def describe(self, objective: str) -> str:
        gains = f"{100 * self.gain_ratio:+.2f}% then {100 * self.second_gain_ratio:+.2f}%"
        if self.improved:
            return f"improvement over defaults on {objective}: {gains} on two seeds"
        return (f"no improvement over defaults: the best trial's {objective} gain ({gains} on "
                "two seeds) is within seed noise")


def _gain(objective: str, base: Mapping[str, Any], trial: Mapping[str, Any]) -> float:
    b, t = base.get(objective), trial.get(objective)
    if b is None or t is None or not math.isfinite(b) or not math.isfinite(t):
        return 0.0
    return OBJECTIVES[objective] * (float(b) - float(t)) / max(abs(float(b)), 1e-12)


def verdict(objective: str, base: Mapping[str, Any], best: Mapping[str, Any],
            base_again: Mapping[str, Any], best_again: Mapping[str, Any],
            min_gain_ratio: float = 0.01) -> Verdict:
    """The best trial improves on the defaults only when it wins on both seeds, by at least
    ``min_gain_ratio`` on each, and by more than the gain itself moves between the seeds (the
    spread of a paired difference is the noise that matters here)."""
    g1 = _gain(objective, base, best)
    g2 = _gain(objective, base_again, best_again)
    improved = min(g1, g2) > max(min_gain_ratio, abs(g1 - g2))
    return Verdict(improved, g1, g2)


def params_yaml(policy: str, params: Mapping[str, Any]) -> str:
    """A ``policy:`` block ready to paste into the router (or simulator) config."""
    import yaml

    defaults = _defaults(policy)
    full = {k: params.get(k, v) for k, v in defaults.items() if k in SEARCH_SPACE or k in params}
    return yaml.safe_dump({"policy": {"name": policy, "params": full}}, sort_keys=False)
