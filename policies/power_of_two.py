"""power_of_two: sample ``choices`` distinct candidates at random, send to the least loaded.

Algorithm (the "power of two choices"): draw ``min(choices, n)`` distinct candidates with the
injected generator; the one with the fewest ``in_flight_requests`` wins, ties going to the
first drawn. Nearly as balanced as least_loaded, but several router replicas with stale load
views do not all pile onto the same backend.

Parameters: ``choices`` (int >= 1, default 2).
Cost per request: O(choices).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from policies.base import PolicyBase
from policies.params import parse_params
from policies.types import ClusterView, Decision, RouteRequest

__all__ = ["PowerOfTwo", "PowerOfTwoParams", "create"]


@dataclass(frozen=True, slots=True)
class PowerOfTwoParams:
    choices: int = 2

    def __post_init__(self) -> None:
        if self.choices < 1:
            raise ValueError("choices: must be >= 1")


class PowerOfTwo(PolicyBase):
    name = "power_of_two"

    def __init__(self, params: PowerOfTwoParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        backends = view.backends
        sample = self._rng.sample(backends, min(self.params.choices, len(backends)))
        best = min(sample, key=lambda b: b.in_flight_requests)  # min keeps the first of ties
        return Decision(backend_id=best.backend_id, reason="power_of_two")


def create(params: Mapping[str, object], rng: random.Random) -> PowerOfTwo:
    return PowerOfTwo(parse_params(PowerOfTwoParams, params, "policy.params"), rng)
