"""session_affinity: sticky sessions, the incumbent load-balancer behaviour kvrouter replaces.

Algorithm: the session key is the configured session header, else the OpenAI ``user`` field
(``RouteRequest.session_key``, filled in that order by the router). A request whose key is
pinned to a live candidate, and was last seen less than ``ttl_s`` ago, goes there. Otherwise
(new or expired session, pinned backend gone or unhealthy, or no key at all) the ``fallback``
picks: ``least_loaded`` (in-flight requests, ties random) or ``hash`` (a stable xxh64 of the
key over the sorted candidates, so router replicas agree without sharing state; keyless
requests still go least-loaded). The pin is written on dispatch, so a session whose backend
disappeared is re-pinned to the new choice. The table is bounded: past ``max_sessions`` the
least recently used session is forgotten. Like cookie stickiness in front of vLLM, it knows
nothing of cache contents or of the prompt.

Parameters: ``ttl_s`` (float > 0, default 600), ``max_sessions`` (int > 0, default 100000),
``fallback`` ("least_loaded" or "hash", default "least_loaded").
Cost per request: O(1) for a pinned session, O(n) over candidates otherwise; memory
O(max_sessions).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import xxhash

from policies.base import PolicyBase
from policies.least_loaded import least_loaded_of
from policies.params import parse_params
from policies.types import BackendId, ClusterView, Decision, RouteRequest

__all__ = ["SessionAffinity", "SessionAffinityParams", "create"]


@dataclass(frozen=True, slots=True)
class SessionAffinityParams:
    ttl_s: float = 600.0
    max_sessions: int = 100_000
    fallback: str = "least_loaded"

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError("ttl_s: must be > 0")
        if self.max_sessions <= 0:
            raise ValueError("max_sessions: must be > 0")
        if self.fallback not in ("least_loaded", "hash"):
            raise ValueError("fallback: expected least_loaded or hash")


class SessionAffinity(PolicyBase):
    name = "session_affinity"

    def __init__(self, params: SessionAffinityParams, rng: random.Random) -> None:
        self.params = params
        self._rng = rng
        # session key -> (backend, last seen); insertion order = recency (LRU at the front).
        self._pins: OrderedDict[str, tuple[BackendId, float]] = OrderedDict()

    def pinned(self, key: str, now_s: float) -> BackendId | None:
        pin = self._pins.get(key)
        if pin is None or now_s - pin[1] >= self.params.ttl_s:
            return None
        return pin[0]

    def choose(self, request: RouteRequest, view: ClusterView) -> Decision:
        key = request.session_key
        if key:
            pinned = self.pinned(key, view.now_s)
            if pinned is not None and any(b.backend_id == pinned for b in view.backends):
                return Decision(backend_id=pinned, reason="session_affinity:sticky")
            if self.params.fallback == "hash":
                ordered = sorted(b.backend_id for b in view.backends)
                index = xxhash.xxh64_intdigest(key.encode()) % len(ordered)
                reason = "new" if pinned is None else "repin"
                return Decision(backend_id=ordered[index], reason=f"session_affinity:{reason}:hash")
            reason = "new" if pinned is None else "repin"
        else:
            reason = "no_key"
        backend = least_loaded_of(view.backends, self._rng)
        return Decision(backend_id=backend.backend_id,
                        reason=f"session_affinity:{reason}:least_loaded")

    def on_dispatched(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        key = request.session_key
        if not key:
            return
        self._pins[key] = (decision.backend_id, now_s)
        self._pins.move_to_end(key)
        while len(self._pins) > self.params.max_sessions:
            self._pins.popitem(last=False)

    def on_backend_removed(self, backend_id: BackendId) -> None:
        for key in [k for k, (b, _) in self._pins.items() if b == backend_id]:
            del self._pins[key]

    def __len__(self) -> int:
        return len(self._pins)


def create(params: Mapping[str, object], rng: random.Random) -> SessionAffinity:
    return SessionAffinity(parse_params(SessionAffinityParams, params, "policy.params"), rng)
