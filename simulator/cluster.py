"""The discrete-event cluster simulator: N engine models behind one router running a real policy.

Virtual time, one ``simulator.des.EventLoop``. What happens, as events:

- arrival: the trace is pulled one request at a time (streamed; only in-flight requests are
  held). The request becomes a ``RouteRequest`` (hash-only traces: ``block_hashes`` = the
  trace's chained block keys, ``prompt_text`` = deterministic characters derived from them so
  equal prefixes give equal text), goes through ``SimRouter.route`` (the policy built by
  ``policies.registry.build_policy``, the same object the live router uses), then to the
  chosen engine. The pooled-LRU oracle sees the prompt at the same instant.
- engine step: ``EngineModel.step(now)``; its outputs (first token, finish) and KV events take
  effect at the step's end. Engines interact only through the router, which acts only at
  queued events, so between two queued events each engine runs alone step after step. KV events reach the router's ``PrefixIndex`` after
  ``event_delay_s``; a whole step's batch is lost with probability ``event_loss_ratio`` (a
  stale index, as after a dropped ZMQ message).
- scrape: every ``scrape_interval_s`` each engine's waiting/running counts, KV usage and
  preemption counter are copied into the router (stale between scrapes); the router's
  in-flight counts are always fresh.

Tiers (issue 18): ``SimConfig.cpu_offload_tokens`` gives every engine a CPU offload LRU of
that size and ``shared_store_tokens`` one ``SharedStore`` all engines write through to and
load from (``simulator.engine.tiers``); their events reach the index like any other. The
oracle then pools the tiers too (``TieredOracle``), the TTFT floor pays the load of what only
the lower pool held (at the fastest tier's rate), and the summary adds hits per tier
(``gpu_hit_rate``, ``cpu_hit_rate``, ``shared_hit_rate``, ``oracle_lower_hit_rate``); without
tiers it is exactly what it was. With ``returning_gap_s`` set, a session's request arriving
that long after its previous one is a returning turn: ``returning_requests``,
``returning_ttft_p50_s``/``p99``, ``returning_hit_rate`` and ``returning_moved_ratio`` (share
routed to another engine than the session's previous request) measure them apart.

Deterministic: same trace, config, policy and seed give identical results (ties in time run in
scheduling order; every random draw comes from generators seeded by ``seed``). Must not import
``router``.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from policies.registry import build_policy
from policies.types import Decision, RouteRequest
from simulator.des import EventLoop
from simulator.engine.cost_model import CostModel, load_cost_model
from simulator.engine.model import EngineConfig, EngineModel, EngineRequest, StepResult
from simulator.engine.tiers import SharedStore
from simulator.inputs import SimConfig, config_dict, prompt_text_of
from simulator.replicas import ReplicaConfig, ReplicaSet
from simulator.results import PooledLruOracle, Reservoir, RunMetrics, TieredOracle, quantile
from simulator.routing import EngineSignals, SimRouter
from simulator.traces import TraceRequest

__all__ = ["ClusterSim", "SimConfig", "prompt_text_of", "simulate"]

Progress = Callable[[int], None]


class _Live:
    __slots__ = (
        "arrival_s",
        "cached_tokens",
        "cpu_cached_tokens",
        "decision",
        "first_token_s",
        "position",
        "returning",
        "route",
        "shared_cached_tokens",
        "trace",
    )

    def __init__(
        self, trace: TraceRequest, route: RouteRequest, decision: Decision, position: int
    ) -> None:
        self.trace = trace
        self.route = route
        self.decision = decision
        self.position = position
        self.arrival_s = trace.arrival_s
        self.first_token_s = -1.0
        self.cached_tokens = 0
        self.cpu_cached_tokens = 0
        self.shared_cached_tokens = 0
        self.returning = False


class ClusterSim:
    """One run: one policy, one trace, one cluster. Build, ``run()``, read the summary."""

    def __init__(
        self,
        config: SimConfig,
        policy_name: str,
        policy_params: Mapping[str, object] | None = None,
        cost: CostModel | None = None,
        progress: Progress | None = None,
        replicas: ReplicaConfig | None = None,
    ) -> None:
        self.config = config
        self.policy_name = policy_name
        self.policy_params = dict(policy_params or {})
        self.cost = cost or load_cost_model(config.cost_profile)
        self.progress = progress
        self.loop = EventLoop()
        policy = build_policy(policy_name, self.policy_params, random.Random(config.seed))
        self.router: SimRouter | ReplicaSet = SimRouter(
            policy,
            config.backends,
            kv_events=config.kv_events,
            engine_signals_max_age_s=config.engine_signals_max_age_s,
        )
        # Several router replicas (--routers R > 1) stand in for the one router.
        self.replicas: ReplicaSet | None = None
        if replicas is not None and replicas.routers > 1:
            self.replicas = ReplicaSet(
                replicas, self.loop, policy_name, self.policy_params, config.backends,
                config.seed, kv_events=config.kv_events,
                engine_signals_max_age_s=config.engine_signals_max_age_s)
            self.replicas.keep_going = lambda: not (self._arrivals_done and not self._live)
            self.router = self.replicas
        self.metrics = RunMetrics(policy_name, config.backends, config.slo_ttft_s, seed=config.seed)
        self._loss_rng = random.Random(config.seed ^ 0x5EED)
        self.engines: list[EngineModel] = []
        # Per engine: the step in progress (its effects are due at its end) or None, and the
        # time an idle engine was handed work (its next step starts then).
        self._pending: list[StepResult | None] = []
        self._wake: list[float | None] = []
        self._live: dict[str, _Live] = {}
        self._held: deque[tuple[TraceRequest, RouteRequest]] = deque()
        self.deferred = 0
        self.max_held = 0
        self._trace: Iterator[TraceRequest] = iter(())
        self._arrivals_done = False
        self._seq = 0
        self.block_size = 0
        self.oracle: PooledLruOracle | None = None
        self.events_dropped = 0
        self.events_delivered = 0
        self._ttft_floor = Reservoir(seed=config.seed + 7)
        self.cpu_hit_tokens = 0  # finished requests' prompt tokens loaded per tier
        self.shared_hit_tokens = 0
        # returning_gap_s: each session's last arrival and engine; returning turns' numbers.
        self._sessions: dict[str, tuple[float, int]] = {}
        self._returning_ttft = Reservoir(seed=config.seed + 11)
        self._returning = [0, 0, 0, 0]  # requests, moved, prompt tokens, hit tokens

    # ---- set-up -------------------------------------------------------------------------------

    def _build_engines(self, block_size: int) -> None:
        cfg = self.config
        blocks = cfg.num_gpu_blocks or self.cost.num_gpu_blocks(block_size)
        if blocks <= 0:
            raise ValueError(
                f"cost profile {self.cost.name!r} gives no KV capacity; set simulation.num_gpu_blocks"
            )
        engine_config = EngineConfig(
            block_size=block_size,
            num_gpu_blocks=blocks,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            max_model_len=cfg.max_model_len,
            cpu_offload_blocks=cfg.cpu_offload_tokens // block_size,
        )
        self.block_size = block_size
        shared = (SharedStore(max(cfg.shared_store_tokens // block_size, 1), block_size)
                  if cfg.shared_store_tokens else None)
        slow = dict(cfg.slow_backends)
        self.engines = [
            EngineModel(engine_config, self.cost.slowed(slow[i]) if i in slow else self.cost,
                        engine_id=b, shared=shared)
            for i, b in enumerate(self.router.backend_ids)
        ]
        self._pending = [None] * cfg.backends
        self._wake = [None] * cfg.backends
        self._busy_start = [-1.0] * cfg.backends
        self._busy_end = [-1.0] * cfg.backends
        if cfg.tiered:
            lower = (engine_config.cpu_offload_blocks * cfg.backends
                     + (shared.capacity_blocks if shared is not None else 0))
            self.oracle = TieredOracle(blocks * cfg.backends, lower)
        else:
            self.oracle = PooledLruOracle(blocks * cfg.backends)

    # ---- events -------------------------------------------------------------------------------

    def _schedule_next_arrival(self) -> None:
        request = next(self._trace, None)
        if request is None:
            self._arrivals_done = True
            return
        if not self.engines:
            self._build_engines(request.block_size)
        elif request.block_size != self.block_size:
            raise ValueError(
                f"request {request.request_id}: block_size {request.block_size} differs from "
                f"the trace's {self.block_size}"
            )
        self.loop.at(request.arrival_s, self._arrive, request)

    def _arrive(self, trace: TraceRequest) -> None:
        now = self.loop.now_s
        self._schedule_next_arrival()
        self.metrics.on_arrival(trace.arrival_s)
        assert self.oracle is not None
        blocks = trace.full_blocks
        oracle_hit = self.oracle.observe(blocks, trace.block_size, trace.input_tokens)
        # The TTFT floor: this prompt prefilled alone on an idle engine with the oracle's hits.
        new_tokens = max(trace.input_tokens - oracle_hit, 1)
        chunks = -(-new_tokens // self.config.max_num_batched_tokens)
        load_s = 0.0
        if isinstance(self.oracle, TieredOracle) and self.oracle.last_lower_tokens:
            rate = (self.cost.h2d_bytes_per_s if self.config.cpu_offload_tokens
                    else self.cost.shared_store_bytes_per_s)
            load_s = self.cost.load_s(self.oracle.last_lower_tokens, rate)
        self._ttft_floor.add(
            self.cost.prefill_work_s(new_tokens, trace.input_tokens - new_tokens)
            + self.cost.step_floor_s * chunks + load_s
        )
        self._seq += 1
        key = str(self._seq)
        route = RouteRequest(
            request_id=key,
            model=self.config.model,
            prompt_tokens=trace.input_tokens,
            prompt_text=prompt_text_of(trace, self.config.chars_per_token),
            session_key=trace.session_id,
            block_hashes=blocks,
            block_size=trace.block_size,
            max_tokens=max(trace.output_tokens, 1),
            stream=True,
            tokens_exact=True,
        )
        # Late binding: a request the policy defers waits in the router, first in first out,
        # and is placed when a finish frees room (as router.proxy holds it).
        if self._held or self.router.defer(route, now):
            self._held.append((trace, route))
            self.deferred += 1
            self.max_held = max(self.max_held, len(self._held))
            return
        self._dispatch(trace, route)

    def _dispatch(self, trace: TraceRequest, route: RouteRequest) -> None:
        now = self.loop.now_s
        key = route.request_id
        decision = self.router.route(route, now)
        position = self.router.position(decision.backend_id)
        self.metrics.on_routed(position)
        live = _Live(trace, route, decision, position)
        if self.config.returning_gap_s and trace.session_id is not None:
            self._mark_returning(live, position)
        engine = self.engines[position]
        try:
            engine.add_request(
                EngineRequest(key, trace.input_tokens, route.max_tokens,
                              block_keys=route.block_hashes), now
            )
        except ValueError:
            # The engine refuses it (too long for its memory or max_model_len), as vLLM would.
            self.metrics.on_failed()
            self.router.finish(route, decision, now, ok=False)
            return
        self._live[key] = live
        if self._pending[position] is None and self._wake[position] is None:
            self._wake[position] = now

    def _mark_returning(self, live: _Live, position: int) -> None:
        session = live.trace.session_id
        assert session is not None
        last = self._sessions.get(session)
        self._sessions[session] = (live.arrival_s, position)
        if last is not None and live.arrival_s - last[0] >= self.config.returning_gap_s:
            live.returning = True
            self._returning[0] += 1
            self._returning[1] += position != last[1]

    def _account(self, position: int, result: StepResult) -> None:
        if result.load_wait:  # idle until a tier load lands: not busy time
            return
        work = result.prefill_tokens + result.decode_requests
        if result.prefill_tokens:
            self.metrics.prefill_gpu_s += result.duration_s * result.prefill_tokens / work
        # Back-to-back steps merge into one busy interval: one timeline update per busy period.
        if result.start_s == self._busy_end[position]:
            self._busy_end[position] = result.end_s
        else:
            self._flush_busy(position)
            self._busy_start[position] = result.start_s
            self._busy_end[position] = result.end_s

    def _flush_busy(self, position: int) -> None:
        start, end = self._busy_start[position], self._busy_end[position]
        if end > start:
            self.metrics.on_busy(position, start, end)
        self._busy_start[position] = self._busy_end[position] = -1.0

    def _advance(self, position: int, horizon_s: float) -> None:
        """Run engine ``position`` up to ``horizon_s``: every step ending by then takes effect.

        Engines only interact through the router, and the router only acts at queued events
        (arrivals, scrapes, event deliveries), so each engine runs alone up to the next one:
        no heap traffic per engine step. A step ending exactly at the horizon takes effect
        before the event there; an engine handed work at the horizon starts after it (so
        simultaneous arrivals share a step).
        """
        engine = self.engines[position]
        loop = self.loop
        result = self._pending[position]
        if result is None:
            wake = self._wake[position]
            if wake is None or wake >= horizon_s:
                return
            self._wake[position] = None
            result = engine.step(wake)
            if result is None:
                return
            self._account(position, result)
        while result.end_s <= horizon_s:
            loop.now_s = result.end_s
            if result.outputs:
                self._outputs(result)
            if result.events:
                self._events(position, result)
            result = engine.step(result.end_s)
            if result is None:
                break
            self._account(position, result)
        self._pending[position] = result

    def _outputs(self, result: StepResult) -> None:
        now = self.loop.now_s
        for out in result.outputs:
            live = self._live.get(out.request_id)
            if live is None:
                raise RuntimeError(f"engine output for unknown request {out.request_id}")
            if out.first_token:
                live.first_token_s = now
                self.router.first_token(live.route, live.decision, now)
                live.cached_tokens = out.cached_tokens
                live.cpu_cached_tokens = out.cpu_cached_tokens
                live.shared_cached_tokens = out.shared_cached_tokens
            if out.finished:
                del self._live[out.request_id]
                self.metrics.on_finished(
                    live.arrival_s,
                    live.first_token_s,
                    now,
                    live.trace.input_tokens,
                    live.cached_tokens,
                    out.output_tokens,
                )
                self.cpu_hit_tokens += live.cpu_cached_tokens
                self.shared_hit_tokens += live.shared_cached_tokens
                if live.returning:
                    self._returning_ttft.add(live.first_token_s - live.arrival_s)
                    self._returning[2] += live.trace.input_tokens
                    self._returning[3] += live.cached_tokens
                self.router.finish(live.route, live.decision, now, ok=True)
                if self.progress is not None:
                    self.progress(self.metrics.finished + self.metrics.failed)
        self._release_held()

    def _release_held(self) -> None:
        held = self._held
        while held and not self.router.defer(held[0][1], self.loop.now_s):
            trace, route = held.popleft()
            self._dispatch(trace, route)

    def _events(self, position: int, result: StepResult) -> None:
        if self.config.event_loss_ratio and self._loss_rng.random() < self.config.event_loss_ratio:
            self.events_dropped += len(result.events)
        elif self.config.event_delay_s:
            self.loop.after(self.config.event_delay_s, self._deliver, position, result.events)
        else:
            self._deliver(position, result.events)

    def _deliver(self, position: int, events: tuple[Any, ...]) -> None:
        now = self.loop.now_s
        for event in events:
            self.router.apply_event(position, event, now)
        self.events_delivered += len(events)

    def _scrape(self) -> None:
        now = self.loop.now_s
        for position, engine in enumerate(self.engines):
            signals = EngineSignals(
                waiting_requests=engine.num_waiting,
                running_requests=engine.num_running,
                kv_usage_ratio=engine.kv_usage_ratio,
                total_kv_blocks=engine.num_gpu_blocks,
                preemptions_total=engine.num_preemptions,
            )
            self.router.scrape(position, signals, now)
        if not (self._arrivals_done and not self._live):
            self.loop.after(self.config.scrape_interval_s, self._scrape)

    # ---- the run ------------------------------------------------------------------------------

    def run(self, requests: Iterable[TraceRequest]) -> dict[str, Any]:
        """Simulate every request to completion; return the summary (``results.json`` entry)."""
        started = time.perf_counter()
        self._trace = iter(requests)
        self._schedule_next_arrival()
        if self.engines:
            self.loop.at(0.0, self._scrape)
            if self.replicas is not None:
                self.replicas.start()
        loop = self.loop
        positions = range(len(self.engines))
        while True:
            horizon_s = loop.next_time_s()
            for position in positions:
                self._advance(position, math.inf if horizon_s is None else horizon_s)
            if horizon_s is None:
                if loop.next_time_s() is None:
                    break
                continue
            loop.run_next()
        for position in range(len(self.engines)):
            self._flush_busy(position)
        if self._live or self._held:
            raise RuntimeError(
                f"{len(self._live)} requests never finished (engine stalled), "
                f"{len(self._held)} never left the router's hold")
        m = self.metrics
        if m.arrived != m.finished + m.failed:
            raise RuntimeError(
                f"conservation broken: {m.arrived} arrived, {m.finished} finished, {m.failed} failed"
            )
        summary = m.summary(self.oracle)
        xs, ys = m.ttft_cdf()
        summary.update(
            arrived=m.arrived,
            ttft_floor_p50_s=quantile(self._ttft_floor.sorted(), 0.5),
            ttft_floor_p99_s=quantile(self._ttft_floor.sorted(), 0.99),
            ttft_cdf={"s": xs, "ratio": ys},
            load={"bucket_s": m.timeline.bucket_s, "utilisation": m.timeline.utilisation()},
            preemptions=sum(e.num_preemptions for e in self.engines),
            engine_hit_tokens=sum(e.prefix_cache_hits_tokens for e in self.engines),
            events_delivered=self.events_delivered,
            events_dropped=self.events_dropped,
            deferred=self.deferred,
            max_held=self.max_held,
            index_entries=self.router.index.entries,
            num_gpu_blocks=self.engines[0].num_gpu_blocks if self.engines else 0,
            block_size=self.block_size,
            cost_profile=self.cost.name,
            policy_params=self.policy_params,
            sim_end_s=self.loop.now_s,
            events_run=self.loop.events_run,
            wall_s=time.perf_counter() - started,
        )
        if self.replicas is not None:
            summary.update(self.replicas.summary())
        if self.config.tiered:
            summary.update(self._tier_summary())
        if self.config.returning_gap_s:
            count, moved, tokens, hits = self._returning
            ttft = self._returning_ttft.sorted()
            summary.update(
                returning_requests=count,
                returning_ttft_p50_s=quantile(ttft, 0.5),
                returning_ttft_p99_s=quantile(ttft, 0.99),
                returning_hit_rate=hits / tokens if tokens else 0.0,
                returning_moved_ratio=moved / count if count else 0.0,
            )
        return summary

    def _tier_summary(self) -> dict[str, Any]:
        """Hits per tier, as shares of all prompt tokens (they add up to ``hit_rate``)."""
        m = self.metrics
        tokens = m.input_tokens or 1
        lower = self.cpu_hit_tokens + self.shared_hit_tokens
        oracle = self.oracle
        return {
            "gpu_hit_rate": (m.hit_tokens - lower) / tokens,
            "cpu_hit_rate": self.cpu_hit_tokens / tokens,
            "shared_hit_rate": self.shared_hit_tokens / tokens,
            "cpu_hit_tokens": self.cpu_hit_tokens,
            "shared_hit_tokens": self.shared_hit_tokens,
            "oracle_lower_hit_rate": (
                oracle.lower_hit_tokens / oracle.input_tokens
                if isinstance(oracle, TieredOracle) and oracle.input_tokens else None),
            "index_shared_blocks": self.router.index.shared_blocks,
        }


def simulate(
    config: SimConfig,
    policy_name: str,
    requests: Iterable[TraceRequest],
    policy_params: Mapping[str, object] | None = None,
    cost: CostModel | None = None,
    progress: Progress | None = None,
    replicas: ReplicaConfig | None = None,
) -> dict[str, Any]:
    """One policy over one trace on one cluster: the summary dict (see ``RunMetrics.summary``)."""
    sim = ClusterSim(config, policy_name, policy_params, cost=cost, progress=progress,
                     replicas=replicas)
    summary = sim.run(requests)
    summary["config"] = config_dict(config)
    return summary
