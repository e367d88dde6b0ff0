"""random: each request goes to a uniformly random candidate.

Algorithm: ``rng.choice(view.backends)`` with the injected ``random.Random``. No parameters.
Cost per request: O(1). Ignores cache and load; the floor any cache-aware policy must beat.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from policies.base import PolicyBase
from policies.params import parse_params
from policies.types import ClusterView, Decision, RouteRequest

__all__ = ["RandomPick", "RandomPickParams", "create"]


@dataclass(frozen=True, slots=True)
class RandomPickParams:
    pass


class RandomPick(PolicyBase):
    name = "random"

    def __init__(self, params: RandomPickParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        return Decision(backend_id=self._rng.choice(view.backends).backend_id, reason="random")


def create(params: Mapping[str, object], rng: random.Random) -> RandomPick:
    return RandomPick(parse_params(RandomPickParams, params, "policy.params"), rng)
