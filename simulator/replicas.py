"""Several router replicas in one simulated cluster (``kvrouter simulate --routers R``).

Production runs R router replicas behind a Kubernetes Service. Each replica here is a full
``SimRouter``: its own policy instance (seeded apart), its own prefix index and its own
in-flight counters. What couples them is what couples real replicas:

- **Requests are spread like a Service spreads connections**: kube-proxy picks a ready
  endpoint uniformly at random per new connection, and a load generator opens one per
  request, so each request goes to a replica drawn uniformly (seeded).
- **KV events reach each replica with its own delay**: on top of the cluster's
  ``event_delay_s``, replica r gets a fixed extra delay drawn in [0, ``event_delay_spread_s``)
  (each replica's ZMQ subscriber is its own socket and process).
- **Replica sync** (``policies.replica_sync``), when on: as live, a replica's messages leave
  at the end of a ``sync_flush_s`` window (the dispatches its policy shares, then its state
  if its own work changed) and at each heartbeat (its state); each reaches every peer after
  ``sync_delay_s``, each copy lost with probability ``sync_loss_ratio``. When off, each
  replica knows only its own requests.

Engine scrapes reach every replica at the same instant (each scrapes the same ``/metrics``).
Held requests (late binding) wait in the cluster's one FIFO and are asked about by the
replica they were assigned to: a simplification (real replicas each hold their own).

Divergence figures per replica (``replicas`` in ``results.json``): its share of requests,
``in_flight_seen_ratio`` (mean over its decisions of the fleet's in-flight requests it saw /
the true count: 1.0 is a perfect view, 1/R is a replica blind to its peers) and its
predicted hit ratio (what it expected the chosen backend to hold / prompt tokens).

Pure and deterministic (virtual time from the cluster's loop, seeded generators). Must not
import ``router``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from policies.kv.events import KvEvent
from policies.kv.index import PrefixIndex
from policies.registry import build_policy
from policies.replica_sync import Message, ReplicaSync, SyncedPolicy, SyncParams
from policies.types import BackendId, Decision, RouteRequest
from simulator.des import EventLoop
from simulator.routing import EngineSignals, SimRouter

__all__ = ["ReplicaConfig", "ReplicaSet"]


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    routers: int = 1
    sync: bool = True
    sync_delay_s: float = 0.001  # one hop on a cluster network, ZMQ PUB/SUB
    sync_flush_s: float = 0.002  # the live router's sync.flush_interval_s
    sync_loss_ratio: float = 0.0
    event_delay_spread_s: float = 0.002
    heartbeat_interval_s: float = 1.0
    peer_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.routers < 1:
            raise ValueError("--routers: each count must be >= 1")
        if not 0.0 <= self.sync_loss_ratio <= 1.0:
            raise ValueError("--sync-loss-ratio must be within [0, 1]")
        if self.sync_delay_s < 0 or self.event_delay_spread_s < 0 or self.sync_flush_s < 0:
            raise ValueError("--sync-delay-s, sync_flush_s and event_delay_spread_s must be >= 0")
        SyncParams(self.peer_timeout_s, self.heartbeat_interval_s)

    @property
    def label(self) -> str:
        return f"R={self.routers} sync {'on' if self.sync else 'off'}"


class ReplicaSet:
    """R ``SimRouter`` replicas that answer ``ClusterSim`` as one router does."""

    def __init__(
        self,
        config: ReplicaConfig,
        loop: EventLoop,
        policy_name: str,
        policy_params: Mapping[str, object],
        n_backends: int,
        seed: int,
        *,
        kv_events: bool = True,
        engine_signals_max_age_s: float = 15.0,
    ) -> None:
        self.config = config
        self.loop = loop
        r_count = config.routers
        # Replica 0 draws what a lone router would; the others are seeded apart.
        self.replicas = [
            SimRouter(
                build_policy(policy_name, policy_params,
                             random.Random(seed if r == 0 else seed * 1_000_003 + r)),
                n_backends,
                kv_events=kv_events,
                engine_signals_max_age_s=engine_signals_max_age_s,
            )
            for r in range(r_count)
        ]
        self.backend_ids = self.replicas[0].backend_ids
        params = SyncParams(config.peer_timeout_s, config.heartbeat_interval_s)
        self.syncs: list[ReplicaSync] = []
        if config.sync:
            # Each replica's policy publishes its lifecycle and sees its peers' load, exactly
            # as in the live router (router.sync): the SimRouter calls it as the proxy does.
            for r, router in enumerate(self.replicas):
                sync = ReplicaSync(f"replica-{r}", router.policy, params)
                router.policy = SyncedPolicy(router.policy, sync,
                                             functools.partial(self._schedule, r))
                self.syncs.append(sync)
        rng = random.Random(seed ^ 0x5E41CE)
        self._spread = rng
        self._event_extra_s = [rng.uniform(0.0, config.event_delay_spread_s) for _ in range(r_count)]
        self._loss = random.Random(seed ^ 0x10557)
        self._owner: dict[str, int] = {}
        self._batches: list[tuple[float, list[tuple[int, KvEvent]]] | None] = [None] * r_count
        self.keep_going: Callable[[], bool] = lambda: False
        self.sync_sent = self.sync_lost = 0
        self._routed = [0] * r_count
        self._seen_sum = [0.0] * r_count
        self._seen_n = [0] * r_count
        self._prompt_tokens = [0] * r_count
        self._predicted_tokens = [0] * r_count

    # ---- what ClusterSim calls ---------------------------------------------------------------

    @property
    def index(self) -> PrefixIndex:
        return self.replicas[0].index

    def position(self, backend_id: BackendId) -> int:
        return self.replicas[0].position(backend_id)

    def start(self) -> None:
        if self.syncs:
            self.loop.after(self.config.heartbeat_interval_s, self._tick)

    def _replica(self, request: RouteRequest) -> int:
        r = self._owner.get(request.request_id)
        if r is None:
            r = self._owner[request.request_id] = self._spread.randrange(len(self.replicas))
        return r

    def defer(self, request: RouteRequest, now_s: float) -> bool:
        return self.replicas[self._replica(request)].defer(request, now_s)

    def route(self, request: RouteRequest, now_s: float) -> Decision:
        r = self._replica(request)
        router = self.replicas[r]
        true_in_flight = sum(x.in_flight() for x in self.replicas)
        if true_in_flight:
            seen = router.in_flight() + (self.syncs[r].peer_in_flight() if self.syncs else 0)
            self._seen_sum[r] += seen / true_in_flight
            self._seen_n[r] += 1
        decision = router.route(request, now_s)
        self._routed[r] += 1
        self._prompt_tokens[r] += request.prompt_tokens
        self._predicted_tokens[r] += decision.predicted_hit_tokens
        return decision

    def first_token(self, request: RouteRequest, decision: Decision, now_s: float) -> None:
        self.replicas[self._owner[request.request_id]].first_token(request, decision, now_s)

    def finish(self, request: RouteRequest, decision: Decision, now_s: float, ok: bool) -> None:
        r = self._owner.pop(request.request_id)
        self.replicas[r].finish(request, decision, now_s, ok)

    def scrape(self, position: int, signals: EngineSignals, now_s: float) -> None:
        for router in self.replicas:
            router.scrape(position, signals, now_s)

    def apply_event(self, position: int, event: KvEvent, now_s: float) -> None:
        for r, extra_s in enumerate(self._event_extra_s):
            if not extra_s:
                self.replicas[r].apply_event(position, event, now_s)
                continue
            due_s = now_s + extra_s
            batch = self._batches[r]
            if batch is not None and batch[0] == due_s:
                batch[1].append((position, event))  # one loop event per delivered step batch
                continue
            events = [(position, event)]
            self._batches[r] = (due_s, events)
            self.loop.at(due_s, self._deliver_events, r, events)

    def in_flight(self) -> int:
        return sum(router.in_flight() for router in self.replicas)

    # ---- sync traffic ----------------------------------------------------------------------------

    def _schedule(self, sender: int) -> None:
        """``sender``'s window opened: it leaves ``sync_flush_s`` on, as live."""
        self.loop.after(self.config.sync_flush_s, self._flush, sender)

    def _flush(self, sender: int) -> None:
        for message in self.syncs[sender].flush(self.loop.now_s):
            self._broadcast(sender, message)

    def _broadcast(self, sender: int, message: Message) -> None:
        loss = self.config.sync_loss_ratio
        targets = []
        for r in range(len(self.replicas)):
            if r == sender:
                continue
            self.sync_sent += 1
            if loss and self._loss.random() < loss:
                self.sync_lost += 1
                continue
            targets.append(r)
        if not targets:
            return
        if self.config.sync_delay_s:
            self.loop.after(self.config.sync_delay_s, self._deliver_sync, targets, message)
        else:
            self._deliver_sync(targets, message)

    def _deliver_sync(self, targets: list[int], message: Message) -> None:
        now = self.loop.now_s
        for r in targets:
            self.syncs[r].receive(message, now)

    def _deliver_events(self, r: int, events: list[tuple[int, KvEvent]]) -> None:
        now = self.loop.now_s
        router = self.replicas[r]
        for position, event in events:
            router.apply_event(position, event, now)
        batch = self._batches[r]
        if batch is not None and batch[1] is events:
            self._batches[r] = None

    def _tick(self) -> None:
        now = self.loop.now_s
        for r, sync in enumerate(self.syncs):
            if sync.heartbeat():
                self._schedule(r)
            sync.expire(now)
        if self.keep_going():
            self.loop.after(self.config.heartbeat_interval_s, self._tick)

    # ---- results -----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        replicas = []
        for r, router in enumerate(self.replicas):
            sync = self.syncs[r] if self.syncs else None
            replicas.append({
                "requests": self._routed[r],
                "in_flight_seen_ratio": (self._seen_sum[r] / self._seen_n[r]
                                         if self._seen_n[r] else None),
                "predicted_hit_ratio": (self._predicted_tokens[r] / self._prompt_tokens[r]
                                        if self._prompt_tokens[r] else 0.0),
                "index_entries": router.index.entries,
                "event_extra_delay_s": self._event_extra_s[r],
                "sync_dropped": sync.dropped() if sync else 0,
                "peers_expired": sync.peers_expired if sync else 0,
            })
        seen = [x["in_flight_seen_ratio"] for x in replicas if x["in_flight_seen_ratio"] is not None]
        return {
            "scale_out": asdict(self.config),
            "routers": self.config.routers,
            "sync": self.config.sync,
            "in_flight_seen_ratio": sum(seen) / len(seen) if seen else None,
            "sync_messages": self.sync_sent,
            "sync_lost": self.sync_lost,
            "replicas": replicas,
        }
