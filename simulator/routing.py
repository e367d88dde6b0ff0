"""The simulator's router: the live router's pool and proxy bookkeeping, in virtual time.

It calls the policy exactly as ``router.proxy`` does, through the plain ``Policy`` protocol:
``choose(request, ClusterView(now_s, candidates, index))``, then the acquire (in-flight
requests and prompt tokens +1) and ``on_dispatched``; at the end a release and
``on_finished(ok)``. Candidates are built like ``router.pool.BackendPool.snapshot``: router-side
counters always fresh, engine-side signals (waiting, running, KV usage, total blocks) from the
last scrape and ``None`` once older than ``engine_signals_max_age_s``. KV events feed one
``policies.kv.index.PrefixIndex`` (precise mode). Nothing here looks at which policy it holds.

Must not import ``router`` (the parity test checks both adapters agree) or the engine model.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.kv.events import KvEvent
from policies.kv.index import PrefixIndex
from policies.types import BackendId, BackendState, ClusterView, Decision, Policy, RouteRequest

__all__ = ["EngineSignals", "PolicyChoiceError", "SimRouter"]


class PolicyChoiceError(RuntimeError):
    """The policy chose a backend that was not among the candidates (a policy bug)."""


@dataclass(frozen=True, slots=True)
class EngineSignals:
    """One scrape of one engine's metrics (vLLM's names in parentheses)."""

    waiting_requests: int  # vllm:num_requests_waiting
    running_requests: int  # vllm:num_requests_running
    kv_usage_ratio: float  # vllm:kv_cache_usage_perc
    total_kv_blocks: int  # vllm:cache_config_info{num_gpu_blocks}


class _Slot:
    __slots__ = (
        "backend_id",
        "in_flight_prompt_tokens",
        "in_flight_requests",
        "scraped_at_s",
        "signals",
    )

    def __init__(self, backend_id: BackendId) -> None:
        self.backend_id = backend_id
        self.in_flight_requests = 0
        self.in_flight_prompt_tokens = 0
        self.signals: EngineSignals | None = None
        self.scraped_at_s: float | None = None


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
        self._slots = [_Slot(b) for b in self.backend_ids]
        self._position = {b: i for i, b in enumerate(self.backend_ids)}
        self.kv_events = kv_events
        self.max_age_s = engine_signals_max_age_s
        self.index = PrefixIndex(max_entries=index_max_entries)

    def position(self, backend_id: BackendId) -> int:
        return self._position[backend_id]

    def snapshot(self, now_s: float) -> tuple[BackendState, ...]:
        states = []
        for slot in self._slots:
            signals = slot.signals
            fresh = (
                signals is not None
                and slot.scraped_at_s is not None
                and now_s - slot.scraped_at_s <= self.max_age_s
            )
            states.append(
                BackendState(
                    backend_id=slot.backend_id,
                    in_flight_requests=slot.in_flight_requests,
                    in_flight_prompt_tokens=slot.in_flight_prompt_tokens,
                    engine_waiting_requests=signals.waiting_requests if fresh and signals else None,
                    engine_running_requests=signals.running_requests if fresh and signals else None,
                    kv_usage_ratio=signals.kv_usage_ratio if fresh and signals else None,
                    total_kv_blocks=signals.total_kv_blocks if fresh and signals else None,
                    kv_events=self.kv_events,
                )
            )
        return tuple(states)

    def view(self, now_s: float) -> ClusterView:
        return ClusterView(now_s=now_s, backends=self.snapshot(now_s), index=self.index)

    def defer(self, request: RouteRequest, now_s: float) -> bool:
        """The policy's answer to "hold this request in the router for now?" (a pure query)."""
        return self.policy.defer(request, self.view(now_s))

    def route(self, request: RouteRequest, now_s: float) -> Decision:
        """Choose, then dispatch: the same calls, in the same order, as the live proxy."""
        view = self.view(now_s)
        decision = self.policy.choose(request, view)
        position = self._position.get(decision.backend_id)
        if position is None:
            raise PolicyChoiceError(
                f"policy {self.policy.name} chose a non-candidate backend {decision.backend_id!r}"
            )
        slot = self._slots[position]
        slot.in_flight_requests += 1
        slot.in_flight_prompt_tokens += request.prompt_tokens
        self.policy.on_dispatched(request, decision, now_s)
        return decision

    def finish(self, request: RouteRequest, decision: Decision, now_s: float, ok: bool) -> None:
        slot = self._slots[self._position[decision.backend_id]]
        slot.in_flight_requests -= 1
        slot.in_flight_prompt_tokens -= request.prompt_tokens
        self.policy.on_finished(request, decision, now_s, ok)

    def scrape(self, position: int, signals: EngineSignals, now_s: float) -> None:
        slot = self._slots[position]
        slot.signals = signals
        slot.scraped_at_s = now_s

    def apply_event(self, position: int, event: KvEvent, now_s: float) -> None:
        if self.kv_events:
            self.index.apply(self.backend_ids[position], event, now_s)

    def in_flight(self) -> int:
        return sum(s.in_flight_requests for s in self._slots)
