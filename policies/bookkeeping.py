"""The pool's bookkeeping, pure: one backend's live load, the state a policy sees of it, and the
one checked decision.

The live router (``router.pool``: every ``Backend`` is a ``BackendLoad``) and the simulator
(``simulator.routing``) keep these counters with this code, so both show a policy the same
candidates and decide through the same call by construction, not only by the parity test.

- ``acquire`` / ``release``: router-side in-flight requests and prompt tokens, +1 when a request
  is dispatched, -1 when it ends. The router counts them itself: they are exact and current,
  where the engine's own counters arrive one scrape late.
- ``scraped``: one scrape of the engine's metrics. Capacity (``total_kv_blocks``,
  ``block_size``) is kept from the last scrape that reported it: vLLM's ``cache_config_info`` is
  constant for an engine's life, and SGLang has no such metric.
- ``state``: the frozen ``BackendState`` a policy sees. Engine-side signals older than
  ``max_age_s`` read as ``None``, so a backend whose scrapes fail falls back to the router-side
  counters by itself.
- ``decide``: ``policy.choose``, then a check that the answer names candidates
  (``PolicyChoiceError`` otherwise: a policy bug, never a client's fault).

Must not import anything outside the standard library and ``policies``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.types import (
    BackendId,
    BackendState,
    ClusterView,
    Decision,
    EngineKind,
    Policy,
    Role,
    RouteRequest,
)

__all__ = ["BackendLoad", "EngineSignals", "PolicyChoiceError", "decide"]


class PolicyChoiceError(Exception):
    """The policy chose a backend that was not among the candidates (a policy bug). An
    ``Exception``, not a ``RuntimeError``: mypyc compiles subclasses of ``Exception`` only."""


@dataclass(frozen=True, slots=True)
class EngineSignals:
    """One scrape of one engine's metrics (vLLM's names; SGLang's in ``router.scrape``)."""

    waiting_requests: int | None = None  # vllm:num_requests_waiting
    running_requests: int | None = None  # vllm:num_requests_running
    kv_usage_ratio: float | None = None  # vllm:kv_cache_usage_perc, 0..1
    total_kv_blocks: int | None = None  # vllm:cache_config_info{num_gpu_blocks}
    block_size: int | None = None  # vllm:cache_config_info{block_size}, tokens
    preemptions_total: int | None = None  # vllm:num_preemptions_total, a counter


_NO_SIGNALS = EngineSignals()


@dataclass(slots=True, eq=False, kw_only=True)
class BackendLoad:
    """One backend's live counters; mutable, owned by one event loop (or one simulation)."""

    backend_id: BackendId
    role: Role = Role.MIXED
    engine: EngineKind = EngineKind.VLLM
    in_flight_requests: int = 0
    in_flight_prompt_tokens: int = 0
    signals: EngineSignals = field(default=_NO_SIGNALS)
    scraped_at_s: float | None = None
    # True once KV events from this backend feed the prefix index (precise mode).
    kv_events: bool = False

    def acquire(self, prompt_tokens: int) -> None:
        self.in_flight_requests += 1
        self.in_flight_prompt_tokens += prompt_tokens

    def release(self, prompt_tokens: int) -> None:
        self.in_flight_requests -= 1
        self.in_flight_prompt_tokens -= prompt_tokens

    def scraped(self, signals: EngineSignals, now_s: float) -> None:
        old = self.signals
        if (signals.total_kv_blocks is None and old.total_kv_blocks is not None) or (
                signals.block_size is None and old.block_size is not None):
            signals = EngineSignals(
                signals.waiting_requests, signals.running_requests, signals.kv_usage_ratio,
                old.total_kv_blocks if signals.total_kv_blocks is None
                else signals.total_kv_blocks,
                old.block_size if signals.block_size is None else signals.block_size,
                signals.preemptions_total)
        self.signals = signals
        self.scraped_at_s = now_s

    def state(self, now_s: float, max_age_s: float) -> BackendState:
        # Runs for every candidate of every request: one freshness test, no copies.
        scraped = self.scraped_at_s
        signals = (self.signals if scraped is not None and now_s - scraped <= max_age_s
                   else _NO_SIGNALS)
        return BackendState(
            backend_id=self.backend_id,
            role=self.role,
            engine=self.engine,
            healthy=True,
            in_flight_requests=self.in_flight_requests,
            in_flight_prompt_tokens=self.in_flight_prompt_tokens,
            engine_waiting_requests=signals.waiting_requests,
            engine_running_requests=signals.running_requests,
            kv_usage_ratio=signals.kv_usage_ratio,
            total_kv_blocks=signals.total_kv_blocks,
            engine_preemptions_total=signals.preemptions_total,
            kv_events=self.kv_events,
        )


def decide(policy: Policy, request: RouteRequest, view: ClusterView) -> Decision:
    """The policy's decision for ``request`` on ``view``, checked against its candidates."""
    decision = policy.choose(request, view)
    chosen = (decision.backend_id,) if decision.prefill_backend_id is None else (
        decision.backend_id, decision.prefill_backend_id)
    for backend_id in chosen:
        for backend in view.backends:
            if backend.backend_id == backend_id:
                break
        else:
            raise PolicyChoiceError(
                f"policy {policy.name} chose a non-candidate backend {backend_id!r}")
    return decision
