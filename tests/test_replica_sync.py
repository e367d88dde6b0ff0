"""Replica sync, pure: peers' states and how they enter the candidates a policy sees, the
dispatches a policy shares, bounded staleness, and a real kv_aware on both sides."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from policies.kv_aware import KvAware, KvAwareParams
from policies.replica_sync import Dispatch, ReplicaSync, State, SyncedPolicy, SyncParams
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
             backends: tuple[BackendState, ...] | None = None) -> tuple[Decision, Dispatch | None]:
    """What a SyncedPolicy does for one own dispatch: asks whether to share it, records it."""
    view = ClusterView(now_s=now_s, backends=sender.overlay(backends or states()))
    decision = sender.policy.choose(req, view)
    share = sender.policy.shares_dispatch(req, decision, now_s)
    sender.policy.on_dispatched(req, decision, now_s)
    return decision, sender.dispatched(req, decision, now_s, share)


def finish(sender: ReplicaSync, req: RouteRequest, decision: Decision, now_s: float) -> None:
    sender.policy.on_finished(req, decision, now_s, True)
    sender.finished(req, decision)


def test_a_peers_state_enters_the_view_and_leaves_it_when_its_work_is_done() -> None:
    a, b = pair()
    decision, _ = dispatch(a, request(1), 0.0)
    assert a.changed
    b.receive(a.state(0.0), 0.001)
    assert not a.changed
    seen = {s.backend_id: s for s in b.overlay(states())}
    assert seen[decision.backend_id].in_flight_requests == 1
    assert seen[decision.backend_id].in_flight_prompt_tokens == 4000
    assert b.peers["a"].lag_s == pytest.approx(0.001)
    finish(a, request(1), decision, 1.0)
    b.receive(a.state(1.0), 1.0)
    assert all(s.in_flight_requests == 0 for s in b.overlay(states()))
    assert b.peer_in_flight() == 0


def test_a_state_counts_repeated_request_ids_apart() -> None:
    """Request ids come from clients: two in flight under one id are two requests, and each
    finish takes one away."""
    a, _b = pair()
    one = states()[:1]
    first, _ = dispatch(a, request(1), 0.0, one)
    dispatch(a, request(1, tokens=1000), 0.0, one)
    assert a.state(0.0).load == (("b0", 2, 5000),)
    finish(a, request(1), first, 0.5)
    assert a.state(0.5).load == (("b0", 1, 4000),)  # (the later one's tokens went first)
    finish(a, request(1), first, 0.6)
    finish(a, request(1), first, 0.7)  # one finish too many: nothing left to take
    assert a.state(0.7).load == ()


def test_a_synced_policys_view_follows_peer_states_between_two_questions() -> None:
    """The overlaid view is kept for the next question about the same view (the proxy asks
    defer, then choose) only while no peer state changed the load."""
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
    synced = SyncedPolicy(recorder, b)
    view = ClusterView(now_s=0.0, backends=states())
    dispatch(a, request(1), 0.0)
    b.receive(a.state(0.0), 0.001)
    synced.defer(request(9), view)
    b.receive(a.state(0.001), 0.002)  # the same load again: the view is kept
    synced.defer(request(9), view)
    assert asked[0] is asked[1]  # the same overlay, built once
    dispatch(a, request(2), 0.002)
    b.receive(a.state(0.002), 0.003)  # a peer's state between two questions about one view
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
    """The peer's pending prefill reaches B in its state (the dispatch itself records nothing
    that outlives it, so it is not sent): B's cold request goes elsewhere. Without the state
    B picks the same idle-looking backend."""
    for synced in (True, False):
        a, b = pair()
        first, message = dispatch(a, request(1, tokens=8000), 0.0)
        assert message is None  # no block hashes: nothing to record
        if synced:
            b.receive(a.state(0.0), 0.0)
        second, _ = dispatch(b, request(2, tokens=8000), 0.0)
        assert (second.backend_id != first.backend_id) is synced


def test_a_peers_queue_drains_between_its_states_unless_overdue() -> None:
    """B reads A's pending prefill at one second a second after it arrived: B's queue hold
    (every backend busy past hold_queue_s) lifts as A's predicted work drains, with no
    further message from A."""
    one = tuple(BackendState(backend_id=x, total_kv_blocks=10_000_000, kv_usage_ratio=0.0)
                for x in ("b0",))
    a, b = pair()
    dispatch(a, request(1, tokens=30_000), 0.0, one)  # a long prefill, well past 0.3 s
    b.receive(a.state(0.0), 0.0)
    view = ClusterView(now_s=0.0, backends=b.overlay(one))
    assert b.policy.defer(request(2), view)
    later = ClusterView(now_s=30.0, backends=b.overlay(one))
    assert not b.policy.defer(request(2), later)


def test_a_peers_kv_commitment_makes_the_replica_hold() -> None:
    """A committed most of both backends' KV: B, which sent nothing, holds a request that
    would not fit (late binding) only when it heard A's state."""
    two = tuple(BackendState(backend_id=x, total_kv_blocks=1000, kv_usage_ratio=0.0)
                for x in ("b0", "b1"))
    params = KvAwareParams(temperature_s=1e-6, temperature_ratio=0.0, hold_queue_s=0.0)
    for synced in (True, False):
        a = ReplicaSync("a", KvAware(params, random.Random(1)))
        b = ReplicaSync("b", KvAware(params, random.Random(2)))
        for i, backend in enumerate(two):
            dispatch(a, request(i, tokens=12_000), 0.0, (backend,))
        if synced:
            b.receive(a.state(0.0), 0.0)
        view = ClusterView(now_s=0.0, backends=b.overlay(two))
        assert b.policy.defer(request(9, tokens=4000), view) is synced


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
    assert first.backend_id == "b1" and message is not None
    finish(a, request(1, hashes=prefix), first, 0.5)
    if synced:
        b.receive(message, 0.0)
        b.receive(a.state(0.5), 0.5)
    second, _ = dispatch(b, request(2, hashes=prefix, tokens=tokens), 100.0)
    assert (second.backend_id == "b1") is synced


def test_a_chain_recorded_lately_is_not_sent_again_until_its_refresh() -> None:
    """A hot prompt's dispatches travel once per record_refresh_s (1 s), as kv_aware records
    them: the others would only refresh what the peer recorded from the first."""
    prefix = tuple(range(100, 140))
    one = states()[:1]
    a, _b = pair()
    sent = [dispatch(a, request(i, hashes=prefix, tokens=len(prefix) * 16), t, one)[1]
            is not None for i, t in enumerate((0.0, 0.1, 0.5, 1.2, 1.3))]
    assert sent == [True, False, False, True, False]


def test_sequence_gaps_count_as_drops_and_a_lost_state_is_healed_by_the_next() -> None:
    a, b = pair()
    d1, _ = dispatch(a, request(1), 0.0)
    b.receive(a.state(0.0), 0.0)
    _lost = a.state(0.1)
    finish(a, request(1), d1, 0.2)
    _lost_too = a.state(0.2)
    assert b.peer_in_flight() == 1  # still the first state's
    b.receive(a.state(1.0), 1.0)
    assert b.peers["a"].dropped == 2
    assert b.peer_in_flight() == 0


@pytest.mark.parametrize("silent_s, kept", [(4.0, 1), (6.0, 0)], ids=["alive", "expired"])
def test_a_silent_peer_is_dropped_with_its_share(silent_s: float, kept: int) -> None:
    a, b = ReplicaSync("a", kv_aware(1), SyncParams(peer_timeout_s=5.0)), ReplicaSync(
        "b", kv_aware(2), SyncParams(peer_timeout_s=5.0))
    first, _ = dispatch(a, request(1, tokens=8000), 0.0)
    b.receive(a.state(0.0), 0.0)
    b.expire(silent_s)
    assert b.peer_in_flight() == kept
    assert len(b.peers) == kept
    assert b.peers_expired == 1 - kept
    # Its pending prefill left B's policy with it: B herds onto A's backend once A is gone.
    second, _ = dispatch(b, request(2, tokens=8000), silent_s)
    assert (second.backend_id != first.backend_id) is bool(kept)


def test_a_malformed_shared_state_raises_and_leaves_the_last_good_one() -> None:
    a, b = pair()
    dispatch(a, request(1, tokens=8000), 0.0)
    good = a.state(0.0)
    assert good.shared and all(len(x) == 7 for x in good.shared.values())
    b.receive(good, 0.0)
    for shared in ({"b0": [1.0, 2.0]}, {"b0": [float("nan")] * 7}, {"b0": [-1.0] * 7},
                   {"b0": ["x"] * 7}, ["b0"]):
        bad: Any = dataclasses.replace(good, seq=good.seq + 1, shared=shared)
        with pytest.raises(ValueError, match="kv_aware shared state"):
            b.receive(bad, 0.0)
    second, _ = dispatch(b, request(2, tokens=8000), 0.0)
    assert second.backend_id != next(iter(good.shared))  # A's good state still counts


def test_a_window_opens_once_and_leaves_its_dispatches_then_one_state() -> None:
    """The flush window the live service and the simulator share: the first change opens it
    (one flush to schedule), everything until the flush leaves together, the State last."""
    a = ReplicaSync("a", kv_aware(1))
    opened: list[float] = []
    synced = SyncedPolicy(a.policy, a, lambda: opened.append(0.0))
    view = ClusterView(now_s=0.0, backends=states())
    reqs = [request(i, hashes=(100 + i,)) for i in range(3)]  # three cold prefixes: all shared
    decisions = []
    for req in reqs:
        decisions.append(synced.choose(req, view))
        synced.on_dispatched(req, decisions[-1], 0.0)
    synced.on_first_token(reqs[0], decisions[0], 0.001)
    assert len(opened) == 1  # one window for the lot
    batch = a.flush(0.002)
    assert [type(m) for m in batch] == [Dispatch, Dispatch, Dispatch, State]
    state = batch[-1]
    assert isinstance(state, State) and state.dispatches == 3  # it counts the window's dispatches
    assert a.flush(0.003) == []  # nothing changed since: an empty window sends nothing
    synced.on_finished(reqs[0], decisions[0], 0.004, True)
    assert len(opened) == 2
    (after,) = a.flush(0.006)
    assert isinstance(after, State) and sum(n for _b, n, _t in after.load) == 2
    assert a.heartbeat() and not a.heartbeat()  # a heartbeat opens a window once
    (beat,) = a.flush(1.0)
    assert isinstance(beat, State)  # liveness: a State even with nothing changed


def test_own_echo_is_ignored_and_params_are_checked() -> None:
    a, _b = pair()
    dispatch(a, request(1), 0.0)
    a.receive(a.state(0.0), 0.0)
    assert a.peer_in_flight() == 0 and not a.peers
    with pytest.raises(ValueError, match="peer_timeout_s"):
        SyncParams(peer_timeout_s=1.0, heartbeat_interval_s=1.0)
    assert isinstance(State("a", 1, 0.0, 0), State)


def test_with_kv_events_a_hit_is_shared_often_enough_to_keep_the_peers_record_alive() -> None:
    """With KV events, a chain with blocks the engine has yet to store is always shared, and
    a predicted hit (it may rest on the recent-dispatch record while events lag) at least
    every recent_ttl_s / 2 (0.25 s), so the peers' record of it never lapses before this
    replica's own."""
    from policies.types import BackendScore, Prediction

    hashes = tuple(range(100, 140))
    req = RouteRequest(request_id="r", model="m", prompt_tokens=len(hashes) * 16 + 6,
                       block_hashes=hashes, tokens_exact=True)

    def decision(uncached: int) -> Decision:
        prediction = Prediction(0.01, 0.001, uncached, req.prompt_tokens, True, 1000)
        return Decision("b0", "kv_aware", scores=(BackendScore("b0", 0.1, 640,
                                                               prediction=prediction),))

    policy = kv_aware(1)

    def shared(uncached: int, now_s: float) -> bool:
        answer = policy.shares_dispatch(req, decision(uncached), now_s)
        policy.on_dispatched(req, decision(uncached), now_s)
        return answer

    assert [shared(6, t) for t in (0.0, 0.1, 0.3, 0.35, 0.6)] == [True, False, True, False, True]
    assert shared(100, 0.61) and shared(100, 0.62)


def test_a_prefix_cached_where_a_peer_has_work_is_not_needed_again_for_admission() -> None:
    """Which prefixes a peer's requests hold is not shared, so where a peer has work the
    prefix cached there counts as held by one of them: a group's request is not predicted
    to wait for room (admission_wait_s, 100 s) on its own backend, which moved groups off
    it in overload. Without the peer, the same numbers predict the wait."""
    from policies.types import BackendMatch

    hashes = tuple(range(100, 190))  # 90 blocks, 1,440 tokens, all cached on b0
    req = RouteRequest(request_id="r", model="m", prompt_tokens=len(hashes) * 16,
                       block_hashes=hashes, tokens_exact=True)
    tight = BackendState(backend_id="b0", total_kv_blocks=1000, kv_usage_ratio=0.95,
                         in_flight_requests=5, in_flight_prompt_tokens=7200)
    for peer in (True, False):
        policy = kv_aware(1)
        if peer:
            policy.on_peer_state("a", {"b0": [0.0, 0.0, 0.0, 1440.0, 0.1, 100.0, 200.0]}, 0.0)
        match = BackendMatch("b0", len(hashes), len(hashes))
        score = policy._score(req, tight, match, 0.0, policy._fleet(
            req, ClusterView(now_s=0.0, backends=(tight,)), (tight,), {"b0": match}))
        waits = score.terms["kv_pressure_s"] >= 100.0
        assert waits is not peer
