"""The simulator's router: the live router's pool and proxy bookkeeping, in virtual time.

It calls the policy exactly as ``router.proxy`` does, with the same shared code
(``policies.bookkeeping``): ``decide(policy, request, ClusterView(now_s, candidates, index))``,
then the acquire (in-flight requests and prompt tokens +1) and ``on_dispatched``; at a streamed
request's first token ``on_first_token``; at the end a release and ``on_finished(ok)``. Candidates are ``BackendLoad.state`` of each backend, as in
``router.pool.BackendPool.snapshot``: router-side counters always fresh, engine-side signals
(waiting, running, KV usage, total blocks) from the last scrape and ``None`` once older than
``engine_signals_max_age_s``. KV events feed one
``policies.kv.index.PrefixIndex`` (precise mode). Nothing here looks at which policy it holds.

Must not import ``router`` (the parity test checks both adapters agree) or the engine model.
"""

from __future__ import annotations

from policies.bookkeeping import BackendLoad, EngineSignals, PolicyChoiceError, decide
from policies.kv.events import KvEvent
from policies.kv.index import PrefixIndex
from policies.types import BackendId, BackendState, ClusterView, Decision, Policy, RouteRequest

__all__ = ["EngineSignals", "PolicyChoiceError", "SimRouter"]


class SimRouter:
    """Routes for one policy over backends ``engine-0`` .. ``engine-{n-1}`` (stable order)."""

    def __init__(
        self,
        policy: Policy,
        n_backends: int,
        *,
        kv_events: bool = True,
        engine_signals_max_age_s: float = 15.0,
        index_max_entries: int = 2_000_000,
    ) -> None:
        self.policy = policy
        self.backend_ids: tuple[BackendId, ...] = tuple(f"engine-{i}" for i in range(n_backends))
        self._slots = [BackendLoad(backend_id=b, kv_events=kv_events) for b in self.backend_ids]
        self._position = {b: i for i, b in enumerate(self.backend_ids)}
        self.kv_events = kv_events
        self.max_age_s = engine_signals_max_age_s
        self.index = PrefixIndex(max_entries=index_max_entries)

    def position(self, backend_id: BackendId) -> int:
        return self._position[backend_id]

    def snapshot(self, now_s: float) -> tuple[BackendState, ...]:
        max_age_s = self.max_age_s
        return tuple(slot.state(now_s, max_age_s) for slot in self._slots)

    def view(self, now_s: float) -> ClusterView:
        return ClusterView(now_s=now_s, backends=self.snapshot(now_s), index=self.index)

    def defer(self, request: RouteRequest, now_s: float) -> bool:
        """The policy's answer to "hold this request in the router for now?" (a query: no random draw)."""
        return self.policy.defer(request, self.view(now_s))

    def route(self, request: RouteRequest, now_s: float) -> Decision:
        """Choose, then dispatch: the same calls, in the same order, as the live proxy."""
        decision = decide(self.policy, request, self.view(now_s))
        self._slots[self._position[decision.backend_id]].acquire(request.prompt_tokens)
        self.policy.on_dispatched(request, decision, now_s)
        return decision

    def first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        """A streamed request's first token: the live proxy's first body chunk."""
        if request.stream:
            self.policy.on_first_token(request, decision, now_s)

    def finish(self, request: RouteRequest, decision: Decision, now_s: float, ok: bool) -> None:
        self._slots[self._position[decision.backend_id]].release(request.prompt_tokens)
        self.policy.on_finished(request, decision, now_s, ok)

    def scrape(self, position: int, signals: EngineSignals, now_s: float) -> None:
        self._slots[position].scraped(signals, now_s)

    def apply_event(self, position: int, event: KvEvent, now_s: float) -> None:
        if self.kv_events:
            self.index.apply(self.backend_ids[position], event, now_s)

    def in_flight(self) -> int:
        return sum(s.in_flight_requests for s in self._slots)
