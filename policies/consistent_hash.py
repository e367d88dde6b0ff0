"""consistent_hash: bounded-load consistent hashing on the session key or the prompt's start.

Algorithm (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam 2018):
each candidate owns ``virtual_nodes`` points on a 64-bit ring (xxh64 of ``"<id>#<i>"``). The
request key is ``RouteRequest.session_key`` when present (and ``use_session_key``), else the
first ``prefix_chars`` characters of the prompt, so requests sharing a system prompt or a
session land together. From the key's hash, walk the ring clockwise to the first backend whose
in-flight requests are below the bound ``ceil(load_factor * (total_in_flight + 1) / n)``; a hot
key therefore spills to its ring successors instead of overloading one backend. Adding or
removing a backend moves only about 1/n of the keys. Rings are memoised per candidate set
(a pure cache: it never changes an answer).

Parameters: ``virtual_nodes`` (int > 0, default 100), ``load_factor`` (float >= 1, default
1.25), ``prefix_chars`` (int > 0, default 256), ``use_session_key`` (bool, default true).
Cost per request: O(prefix_chars) to hash the key, O(log(n * virtual_nodes)) to find its point,
plus the walk past overloaded backends (at most n distinct backends); a new candidate set costs
O(n * virtual_nodes * log) once.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import xxhash

from policies.base import PolicyBase
from policies.params import parse_params
from policies.types import BackendId, ClusterView, Decision, RouteRequest

__all__ = ["ConsistentHash", "ConsistentHashParams", "create"]

_MAX_RINGS = 16


@dataclass(frozen=True, slots=True)
class ConsistentHashParams:
    virtual_nodes: int = 100
    load_factor: float = 1.25
    prefix_chars: int = 256
    use_session_key: bool = True

    def __post_init__(self) -> None:
        if self.virtual_nodes <= 0:
            raise ValueError("virtual_nodes: must be > 0")
        if self.load_factor < 1.0:
            raise ValueError("load_factor: must be >= 1")
        if self.prefix_chars <= 0:
            raise ValueError("prefix_chars: must be > 0")


@dataclass(frozen=True, slots=True)
class _Ring:
    points: list[int]
    owners: list[BackendId]


class ConsistentHash(PolicyBase):
    name = "consistent_hash"
    reads_prompt_text = True

    def __init__(self, params: ConsistentHashParams) -> None:
        self.params = params
        self._rings: dict[frozenset[BackendId], _Ring] = {}

    def _ring(self, ids: frozenset[BackendId]) -> _Ring:
        ring = self._rings.get(ids)
        if ring is None:
            nodes = sorted(
                (xxhash.xxh64_intdigest(f"{backend_id}#{i}".encode()), backend_id)
                for backend_id in ids
                for i in range(self.params.virtual_nodes)
            )
            ring = _Ring([p for p, _ in nodes], [b for _, b in nodes])
            if len(self._rings) >= _MAX_RINGS:
                self._rings.pop(next(iter(self._rings)))
            self._rings[ids] = ring
        return ring

    def key_of(self, request: RouteRequest) -> str:
        if self.params.use_session_key and request.session_key:
            return "s:" + request.session_key
        return "p:" + request.prompt_text[: self.params.prefix_chars]

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        loads = {b.backend_id: b.in_flight_requests for b in view.backends}
        ring = self._ring(frozenset(loads))
        bound = math.ceil(self.params.load_factor * (sum(loads.values()) + 1) / len(loads))
        start = bisect.bisect_left(ring.points, xxhash.xxh64_intdigest(self.key_of(request).encode()))
        seen: set[BackendId] = set()
        first: BackendId | None = None
        for step in range(len(ring.points)):
            backend_id = ring.owners[(start + step) % len(ring.points)]
            if backend_id in seen:
                continue
            seen.add(backend_id)
            first = first or backend_id
            if loads[backend_id] < bound:
                reason = "consistent_hash" if backend_id == first else "consistent_hash:spill"
                return Decision(backend_id=backend_id, reason=reason)
            if len(seen) == len(loads):
                break
        # Unreachable while the bound exceeds the average load; kept as a safe answer.
        assert first is not None
        return Decision(backend_id=first, reason="consistent_hash:all_over_bound")


def create(params: Mapping[str, object], rng: random.Random) -> ConsistentHash:
    return ConsistentHash(parse_params(ConsistentHashParams, params, "policy.params"))
