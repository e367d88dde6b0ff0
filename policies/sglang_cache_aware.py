"""sglang_cache_aware: a faithful reproduction of sglang-router's ``cache_aware`` policy, as a
baseline for fair comparisons. Its weaknesses are reproduced on purpose, not fixed.

Algorithm (sglang-router 0.3.x, defaults ``--cache-threshold 0.3 --balance-abs-threshold 64
--balance-rel-threshold 1.5``; see ``/work/shared/notes/peers.md``):
1. Load = the router's own in-flight request count per backend (``in_flight_requests``; the
   engines' numbers are ignored). Imbalanced when ``max - min > balance_abs_threshold`` and
   ``max > balance_rel_threshold * min``: then the least-loaded backend wins outright,
   whatever the cache holds.
2. Otherwise: match the prompt's characters (``prompt_text``; chat = concatenated message
   text) in one approximate radix tree (``policies.char_tree``). Match rate = matched chars /
   prompt chars. Above ``cache_threshold``: the first backend recorded on the deepest matched
   node. Otherwise the least-loaded backend, ties going to the first in the candidate order
   (hence new prefixes collapse onto the first backend at low concurrency).
3. ``on_dispatched`` inserts the whole prompt under the chosen backend: the tree learns only
   from the router's own decisions, never from the engines.
4. Every ``eviction_interval_s`` (checked on dispatch) each backend's characters are trimmed
   to ``max_tree_chars`` by least recently used leaves.

Parameters: ``cache_threshold`` (ratio, 0.3), ``balance_abs_threshold`` (requests, 64),
``balance_rel_threshold`` (ratio, 1.5), ``max_tree_chars`` (per backend, 2**26),
``eviction_interval_s`` (60). Cost per request: O(prompt characters) for the match and the
insert, O(backends) for the loads; eviction O(tree) once per interval.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from policies.base import PolicyBase
from policies.char_tree import CharTree
from policies.params import parse_params
from policies.types import (
    BackendId,
    BackendScore,
    BackendState,
    ClusterView,
    Decision,
    RouteRequest,
)

__all__ = ["SglangCacheAware", "SglangCacheAwareParams", "create"]


@dataclass(frozen=True, slots=True)
class SglangCacheAwareParams:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_chars: int = 2**26
    eviction_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError("cache_threshold must be within [0, 1]")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ValueError("balance_abs_threshold must be >= 0, balance_rel_threshold >= 1")
        if self.max_tree_chars < 1 or self.eviction_interval_s <= 0:
            raise ValueError("max_tree_chars must be >= 1 and eviction_interval_s > 0")


def _least_loaded(backends: tuple[BackendState, ...]) -> BackendState:
    # min() keeps the first of equal loads: the peer's tie rule.
    return min(backends, key=lambda b: b.in_flight_requests)


class SglangCacheAware(PolicyBase):
    name = "sglang_cache_aware"
    reads_prompt_text = True

    def __init__(self, params: SglangCacheAwareParams) -> None:
        self.params = params
        self.tree = CharTree()
        self._last_eviction_s: float | None = None

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        p = self.params
        backends = view.backends
        loads = [b.in_flight_requests for b in backends]
        high, low = max(loads), min(loads)
        imbalanced = high - low > p.balance_abs_threshold and high > p.balance_rel_threshold * low
        text = request.prompt_text
        matched_chars, tenant = (0, None) if imbalanced else self.tree.prefix_match(text)
        match_rate = matched_chars / len(text) if text else 0.0
        by_id = {b.backend_id: b for b in backends}
        if imbalanced:
            chosen, reason = _least_loaded(backends), "imbalanced: least loaded"
        elif match_rate > p.cache_threshold and tenant in by_id:
            chosen, reason = by_id[tenant], "cache match above threshold"
        else:
            chosen, reason = _least_loaded(backends), "low cache match: least loaded"
        predicted = 0
        if chosen.backend_id == tenant and text:
            # Characters are all it knows; convert at the prompt's own chars-per-token rate.
            predicted = matched_chars * request.prompt_tokens // len(text)
        scores = tuple(
            BackendScore(
                backend_id=b.backend_id,
                score=float(b.in_flight_requests),
                matched_tokens=predicted if b is chosen else 0,
                terms={
                    "in_flight_requests": float(b.in_flight_requests),
                    "matched_chars": float(matched_chars if b.backend_id == tenant else 0),
                    "match_rate": match_rate if b.backend_id == tenant else 0.0,
                },
            )
            for b in backends
        )
        return Decision(
            backend_id=chosen.backend_id,
            reason=f"sglang_cache_aware: {reason}",
            predicted_hit_tokens=predicted,
            scores=scores,
        )

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.tree.insert(request.prompt_text, decision.backend_id, now_s)
        if self._last_eviction_s is None:
            self._last_eviction_s = now_s
        elif now_s - self._last_eviction_s >= self.params.eviction_interval_s:
            self.tree.evict_to(self.params.max_tree_chars)
            self._last_eviction_s = now_s

    def on_backend_removed(self, backend_id: BackendId) -> None:
        self.tree.remove_tenant(backend_id)


def create(params: Mapping[str, object], rng: random.Random) -> SglangCacheAware:
    return SglangCacheAware(parse_params(SglangCacheAwareParams, params, "policy.params"))
