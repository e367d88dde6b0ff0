"""round_robin: each request goes to the next candidate in turn.

Algorithm: a counter advanced on dispatch (not in ``choose``, so ``/debug/route`` does not
skip a backend) indexes the candidates modulo their count. No parameters. Cost per request:
O(1). Ignores cache contents and load; the baseline every other policy is measured against.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from policies.base import PolicyBase
from policies.params import parse_params
from policies.types import ClusterView, Decision, RouteRequest

__all__ = ["RoundRobin", "RoundRobinParams", "create"]


@dataclass(frozen=True, slots=True)
class RoundRobinParams:
    pass


class RoundRobin(PolicyBase):
    name = "round_robin"

    def __init__(self, params: RoundRobinParams) -> None:
        self.params = params
        self._counter = 0

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        backend = view.backends[self._counter % len(view.backends)]
        return Decision(backend_id=backend.backend_id, reason="round_robin")

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self._counter += 1


def create(params: Mapping[str, object], rng: random.Random) -> RoundRobin:
    return RoundRobin(parse_params(RoundRobinParams, params, "policy.params"))
