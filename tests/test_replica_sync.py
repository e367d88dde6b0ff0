"""Replica sync, pure: the ledger of peers' in-flight work, its bounded staleness, how it
enters the candidates a policy sees, and the peers' lifecycle replayed into a real policy."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from policies.kv_aware import KvAware, KvAwareParams
from policies.replica_sync import (
    Dispatch,
    Finish,
    Heartbeat,
    ReplicaSync,
    SyncedPolicy,
    SyncParams,
)
from policies.types import BackendState, ClusterView, Decision, RouteRequest

BACKENDS = ("b0", "b1", "b2")


def states() -> tuple[BackendState, ...]:
    # b0 is the best idle backend (the others' KV is past the knee), so every replica that
    # sees no load there picks it.
    return tuple(BackendState(backend_id=b, total_kv_blocks=10_000,
                              kv_usage_ratio=0.0 if b == "b0" else 0.85) for b in BACKENDS)


def request(i: int, tokens: int = 4000, hashes: tuple[int, ...] = ()) -> RouteRequest:
    return RouteRequest(request_id=f"r{i}", model="m", prompt_tokens=tokens, block_hashes=hashes,
                        tokens_exact=True, max_tokens=64)


def kv_aware(seed: int) -> KvAware:
    return KvAware(KvAwareParams(temperature_s=1e-6, temperature_ratio=0.0), random.Random(seed))


def pair() -> tuple[ReplicaSync, ReplicaSync]:
    return ReplicaSync("a", kv_aware(1)), ReplicaSync("b", kv_aware(2))


def dispatch(sender: ReplicaSync, req: RouteRequest, now_s: float,
             backends: tuple[BackendState, ...] | None = None) -> tuple[Decision, Dispatch]:
    view = ClusterView(now_s=now_s, backends=sender.overlay(backends or states()))
    decision = sender.policy.choose(req, view)
    sender.policy.on_dispatched(req, decision, now_s)
    return decision, sender.dispatched(req, decision, now_s)


def test_peer_dispatch_enters_the_view_and_its_finish_leaves_it() -> None:
    a, b = pair()
    decision, message = dispatch(a, request(1), 0.0)
    b.receive(message, 0.001)
    seen = {s.backend_id: s for s in b.overlay(states())}
    assert seen[decision.backend_id].in_flight_requests == 1
    assert seen[decision.backend_id].in_flight_prompt_tokens == 4000
    assert b.peers["a"].lag_s == pytest.approx(0.001)
    finish = a.finished(request(1), decision, 1.0, ok=True)
    assert finish is not None
    b.receive(finish, 1.0)
    assert all(s.in_flight_requests == 0 for s in b.overlay(states()))


def test_a_synced_policys_view_follows_peer_messages_between_two_questions() -> None:
    """The overlaid view is kept for the next question about the same view (the proxy asks
    defer, then choose) only while no peer message changed the ledger."""
    a, b = pair()
    asked: list[ClusterView] = []

    class Recorder:
        """kv_aware, recording the views ``defer`` is asked about. A wrapper, not a subclass:
        a compiled kv_aware (kvrouter.native) cannot be subclassed from Python."""

        def __init__(self, inner: KvAware) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def defer(self, request: RouteRequest, view: ClusterView) -> bool:
            asked.append(view)
            return False

    recorder: Any = Recorder(KvAware(KvAwareParams(), random.Random(0)))
    synced = SyncedPolicy(recorder, b, lambda m: None)
    view = ClusterView(now_s=0.0, backends=states())
    first, second = dispatch(a, request(1), 0.0)[1], dispatch(a, request(2), 0.0)[1]
    b.receive(first, 0.001)
    synced.defer(request(9), view)
    synced.defer(request(9), view)
    assert asked[0] is asked[1]  # the same overlay, built once
    b.receive(second, 0.002)  # a peer's dispatch between two questions about one view
    synced.defer(request(9), view)
    loads = [sum(s.in_flight_requests for s in v.backends) for v in asked]
    assert loads == [1, 1, 2]
    # the overlay changes only the two counters
    overlaid = {s.backend_id: s for s in asked[2].backends}
    for s in states():
        load = b.peer_load(s.backend_id)
        assert overlaid[s.backend_id] == dataclasses.replace(
            s, in_flight_requests=load[0], in_flight_prompt_tokens=load[1])


def test_a_synced_replica_does_not_herd_onto_the_backend_its_peer_just_loaded() -> None:
    """The peer's dispatch is replayed into B's policy (pending prefill): B's cold request
    goes elsewhere. Without the message B picks the same idle-looking backend."""
    for synced in (True, False):
        a, b = pair()
        first, message = dispatch(a, request(1, tokens=8000), 0.0)
        if synced:
            b.receive(message, 0.0)
        second, _ = dispatch(b, request(2, tokens=8000), 0.0)
        assert (second.backend_id != first.backend_id) is synced


@pytest.mark.parametrize("synced", [True, False], ids=["synced", "alone"])
def test_placement_is_shared_a_peers_cold_prefix_is_followed(synced: bool) -> None:
    """A sent a prefix to b1 (then the best for it); long after, with no KV events ever
    saying where it is, B follows it there only if it heard of the dispatch."""
    prefix = tuple(range(100, 500))
    tokens = len(prefix) * 16
    a, b = pair()
    only_b1 = tuple(BackendState(backend_id=x, total_kv_blocks=10_000,
                                 kv_usage_ratio=0.0 if x == "b1" else 0.85) for x in BACKENDS)
    first, message = dispatch(a, request(1, hashes=prefix, tokens=tokens), 0.0, only_b1)
    assert first.backend_id == "b1"
    finish = a.finished(request(1, hashes=prefix), first, 0.5, ok=True)
    if synced:
        b.receive(message, 0.0)
        assert finish is not None
        b.receive(finish, 0.5)
    second, _ = dispatch(b, request(2, hashes=prefix, tokens=tokens), 100.0)
    assert (second.backend_id == "b1") is synced


def test_sequence_gaps_count_as_drops_and_unknown_finishes_are_ignored() -> None:
    a, b = pair()
    _d1, m1 = dispatch(a, request(1), 0.0)
    _d2, _lost = dispatch(a, request(2), 0.0)
    b.receive(m1, 0.0)
    f2 = a.finished(request(2), _d2, 0.1, ok=True)
    assert f2 is not None
    b.receive(f2, 0.1)
    assert b.peers["a"].dropped == 1
    assert b.unknown_finishes == 1
    assert b.peer_in_flight() == 1


def test_heartbeat_finishes_peer_requests_whose_finish_was_lost() -> None:
    a, b = pair()
    _d1, m1 = dispatch(a, request(1), 0.0)
    d2, m2 = dispatch(a, request(2), 0.0)
    _d3, m3 = dispatch(a, request(3), 0.0)
    for m in (m1, m2, m3):
        b.receive(m, 0.0)
    a.finished(request(2), d2, 0.2, ok=True)  # its Finish is lost in transit, and it is
    # not the oldest in flight: only the heartbeat's list of live requests can retire it
    d4, _lost = dispatch(a, request(4, tokens=1234), 0.3)  # its Dispatch is lost too
    b.receive(a.heartbeat(1.0), 1.0)
    assert b.peer_in_flight() == 3  # 1 and 3 as sent, 4 re-added from the heartbeat
    assert b.peer_load(d4.backend_id)[1] >= 1234
    assert b.peers["a"].dropped == 2


@pytest.mark.parametrize("silent_s, kept", [(4.0, 1), (6.0, 0)], ids=["alive", "expired"])
def test_a_silent_peer_is_dropped_with_its_in_flight_share(silent_s: float, kept: int) -> None:
    a, b = ReplicaSync("a", kv_aware(1), SyncParams(peer_timeout_s=5.0)), ReplicaSync(
        "b", kv_aware(2), SyncParams(peer_timeout_s=5.0))
    _d, message = dispatch(a, request(1), 0.0)
    b.receive(message, 0.0)
    b.expire(silent_s)
    assert b.peer_in_flight() == kept
    assert len(b.peers) == kept
    assert b.peers_expired == 1 - kept


def test_over_age_peer_requests_expire_while_the_peer_stays() -> None:
    b = ReplicaSync("b", kv_aware(2), SyncParams(max_in_flight_s=10.0))
    a = ReplicaSync("a", kv_aware(1))
    _d, m1 = dispatch(a, request(1), 0.0)
    b.receive(m1, 0.0)
    _d, m2 = dispatch(a, request(2), 8.0)
    b.receive(m2, 8.0)
    beat = Heartbeat("a", m2.seq + 1, 11.0, next_request_seq=3,
                     in_flight=((1, m1.decision.backend_id, 4000), (2, m2.decision.backend_id, 4000)))
    b.receive(beat, 11.0)
    b.expire(11.0)
    assert b.requests_expired == 1 and b.peer_in_flight() == 1


def test_heartbeat_adds_peer_requests_whose_dispatch_was_lost() -> None:
    a, b = pair()
    d1, _lost = dispatch(a, request(1, tokens=3000), 0.0)
    b.receive(a.heartbeat(1.0), 1.0)
    assert b.peer_load(d1.backend_id) == (1, 3000)
    b.receive(a.finished(request(1), d1, 2.0, ok=True) or _lost, 2.0)
    assert b.peer_in_flight() == 0 and b.unknown_finishes == 0
    # A Finish whose Dispatch was lost, then a stale heartbeat still listing it: not re-added.
    d2, _lost2 = dispatch(a, request(2), 3.0)
    stale = a.heartbeat(3.0)
    _skipped = a.heartbeat(3.0)  # lost too
    finish = a.finished(request(2), d2, 3.5, ok=True)
    assert finish is not None
    b.receive(finish, 3.5)
    b.receive(dataclasses.replace(stale, seq=finish.seq + 1), 3.6)
    assert b.peer_in_flight() == 0


def test_own_echo_is_ignored_and_params_are_checked() -> None:
    a, _b = pair()
    _d, message = dispatch(a, request(1), 0.0)
    a.receive(message, 0.0)
    assert a.peer_in_flight() == 0 and not a.peers
    with pytest.raises(ValueError, match="peer_timeout_s"):
        SyncParams(peer_timeout_s=1.0, heartbeat_interval_s=1.0)
    assert isinstance(Finish("a", 1, 0.0, 1, True), Finish)
