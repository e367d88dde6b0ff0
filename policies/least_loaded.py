"""least_loaded: each request goes to the candidate with the fewest requests in flight.

Algorithm: load = the router's own ``in_flight_requests`` per backend (or, with
``by_prompt_tokens``, its ``in_flight_prompt_tokens``, then requests); the minimum wins and
ties are broken uniformly at random with the injected generator, so equal backends share new
work instead of the first one taking it all (the peers' tie-break).

Parameters: ``by_prompt_tokens`` (bool, default false).
Cost per request: O(n) over the candidates.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from policies.base import PolicyBase
from policies.params import parse_params
from policies.types import BackendState, ClusterView, Decision, RouteRequest

__all__ = ["LeastLoaded", "LeastLoadedParams", "create", "least_loaded_of"]


@dataclass(frozen=True, slots=True)
class LeastLoadedParams:
    by_prompt_tokens: bool = False


def least_loaded_of(
    backends: tuple[BackendState, ...], rng: random.Random, by_prompt_tokens: bool = False
) -> BackendState:
    """The least-loaded backend, ties broken at random; shared by policies that fall back."""

    def load(b: BackendState) -> tuple[int, int]:
        if by_prompt_tokens:
            return (b.in_flight_prompt_tokens, b.in_flight_requests)
        return (b.in_flight_requests, 0)

    best = min(load(b) for b in backends)
    tied = [b for b in backends if load(b) == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


class LeastLoaded(PolicyBase):
    name = "least_loaded"

    def __init__(self, params: LeastLoadedParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        backend = least_loaded_of(view.backends, self._rng, self.params.by_prompt_tokens)
        return Decision(backend_id=backend.backend_id, reason="least_loaded")


def create(params: Mapping[str, object], rng: random.Random) -> LeastLoaded:
    return LeastLoaded(parse_params(LeastLoadedParams, params, "policy.params"), rng)
