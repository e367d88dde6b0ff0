"""Baseline policies: table-driven decisions, determinism with a seed, and their invariants."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from policies.params import ParamError
from policies.registry import build_policy
from policies.types import BackendState, ClusterView, RouteRequest

BASELINES = ["round_robin", "random", "least_loaded", "power_of_two", "session_affinity",
             "consistent_hash"]


def view(*loads: int, now_s: float = 0.0, names: str = "abcdefgh") -> ClusterView:
    return ClusterView(now_s=now_s, backends=tuple(
        BackendState(backend_id=names[i], in_flight_requests=load) for i, load in enumerate(loads)))


def req(session: str | None = None, prompt: str = "hello", rid: str = "r") -> RouteRequest:
    return RouteRequest(request_id=rid, model="m", prompt_tokens=len(prompt) // 4,
                        prompt_text=prompt, session_key=session)


def run(policy, requests, v: ClusterView) -> list[str]:
    chosen = []
    for r in requests:
        d = policy.choose(r, v)
        policy.on_dispatched(r, d, v.now_s)
        chosen.append(d.backend_id)
    return chosen


@pytest.mark.parametrize("name", BASELINES, ids=BASELINES)
def test_only_candidates_and_same_seed_same_answers(name):
    v = view(0, 3, 1, 2)
    requests = [req(session=f"s{i % 5}", prompt=f"p{i % 7} " * 20, rid=str(i)) for i in range(60)]
    first = run(build_policy(name, {}, random.Random(7)), requests, v)
    second = run(build_policy(name, {}, random.Random(7)), requests, v)
    assert first == second
    assert set(first) <= {"a", "b", "c", "d"}


# random and power_of_two answer from the generator by design, so they are not in this table.
DETERMINISTIC = ["round_robin", "least_loaded", "session_affinity", "consistent_hash"]


@pytest.mark.parametrize("name", DETERMINISTIC, ids=DETERMINISTIC)
def test_choose_does_not_record(name):
    """/debug/route calls choose alone; a deterministic policy must answer the same again."""
    policy = build_policy(name, {}, random.Random(1))
    v = view(1, 0, 2)
    answers = {policy.choose(req(session="x"), v).backend_id for _ in range(5)}
    assert len(answers) == 1


@pytest.mark.parametrize(
    ("loads", "expected"),
    [((3, 1, 2), {"b"}), ((0, 5, 0), {"a", "c"}), ((4,), {"a"}), ((2, 2, 2, 2), set("abcd"))],
    ids=["unique-min", "tie-two", "single", "all-tied"],
)
def test_least_loaded_picks_minimum_ties_random(loads, expected):
    policy = build_policy("least_loaded", {}, random.Random(3))
    seen = Counter(policy.choose(req(), view(*loads)).backend_id for _ in range(400))
    assert set(seen) == expected
    assert min(seen.values()) > 400 / len(expected) * 0.6  # ties shared, not first-wins


def test_least_loaded_by_prompt_tokens():
    v = ClusterView(now_s=0, backends=(
        BackendState("a", in_flight_requests=1, in_flight_prompt_tokens=9000),
        BackendState("b", in_flight_requests=3, in_flight_prompt_tokens=100)))
    assert build_policy("least_loaded", {}, random.Random(0)).choose(req(), v).backend_id == "a"
    policy = build_policy("least_loaded", {"by_prompt_tokens": True}, random.Random(0))
    assert policy.choose(req(), v).backend_id == "b"


@pytest.mark.parametrize(
    ("choices", "loads", "never"),
    [(2, (0, 9, 9, 9), None), (2, (9, 0, 0, 0), "a"), (4, (5, 4, 0, 7), None)],
    ids=["two-of-four", "heaviest-never-wins", "all-sampled"],
)
def test_power_of_two(choices, loads, never):
    policy = build_policy("power_of_two", {"choices": choices}, random.Random(5))
    seen = Counter(policy.choose(req(), view(*loads)).backend_id for _ in range(300))
    if never:
        assert never not in seen
    if choices == 4:
        assert seen == Counter({"c": 300})
    if loads == (0, 9, 9, 9):
        # `a` wins whenever sampled: with 2 of 4 that is half the time.
        assert 100 < seen["a"] < 200


SESSION_CASES = [
    # (description, steps) where each step is (session, now_s, candidates' loads, expected)
    ("sticky-despite-load", [("u1", 0, (0, 1), "a"), ("u1", 1, (50, 0), "a")]),
    ("new-session-least-loaded", [("u1", 0, (3, 0, 5), "b"), ("u2", 1, (3, 1, 0), "c")]),
    ("ttl-expiry-repins", [("u1", 0, (0, 5), "a"), ("u1", 700, (9, 0), "b")]),
    ("no-key-least-loaded", [(None, 0, (2, 1), "b"), (None, 1, (0, 4), "a")]),
]


@pytest.mark.parametrize("steps", [c[1] for c in SESSION_CASES], ids=[c[0] for c in SESSION_CASES])
def test_session_affinity_table(steps):
    policy = build_policy("session_affinity", {"ttl_s": 600}, random.Random(0))
    for session, now_s, loads, expected in steps:
        v = view(*loads, now_s=now_s)
        r = req(session=session)
        d = policy.choose(r, v)
        assert d.backend_id == expected, (session, now_s, d)
        policy.on_dispatched(r, d, now_s)


def test_session_affinity_repins_when_backend_gone_and_forgets_removed():
    policy = build_policy("session_affinity", {}, random.Random(0))
    r = req(session="u1")
    d = policy.choose(r, view(0, 1, 1))
    policy.on_dispatched(r, d, 0)
    assert d.backend_id == "a"
    # `a` is unhealthy: not a candidate; the session moves and stays moved.
    gone = ClusterView(now_s=1, backends=view(1, 0, names="bc").backends)
    d2 = policy.choose(r, gone)
    assert d2.backend_id == "c" and "repin" in d2.reason
    policy.on_dispatched(r, d2, 1)
    assert policy.choose(r, view(0, 0, 0, now_s=2)).backend_id == "c"
    policy.on_backend_removed("c")
    assert len(policy) == 0


def test_session_affinity_table_is_bounded_lru():
    policy = build_policy("session_affinity", {"max_sessions": 3}, random.Random(0))
    v = view(0, 0)
    for i in range(10):
        r = req(session=f"s{i}")
        policy.on_dispatched(r, policy.choose(r, v), float(i))
    assert len(policy) == 3
    assert policy.pinned("s9", 10) is not None and policy.pinned("s0", 10) is None


def test_session_affinity_hash_fallback_agrees_across_replicas():
    one = build_policy("session_affinity", {"fallback": "hash"}, random.Random(1))
    two = build_policy("session_affinity", {"fallback": "hash"}, random.Random(2))
    v = view(0, 0, 0, 0)
    keys = [f"user-{i}" for i in range(40)]
    assert [one.choose(req(k), v).backend_id for k in keys] == \
        [two.choose(req(k), v).backend_id for k in keys]
    assert len({one.choose(req(k), v).backend_id for k in keys}) == 4


def test_consistent_hash_same_prefix_same_backend_and_minimal_movement():
    policy = build_policy("consistent_hash", {"prefix_chars": 32}, random.Random(0))
    prompts = [f"system prompt {i:03d} " * 4 for i in range(200)]
    v4 = view(0, 0, 0, 0)
    before = {p: policy.choose(req(prompt=p), v4).backend_id for p in prompts}
    # Same first 32 characters, different tails: same backend.
    assert policy.choose(req(prompt=prompts[5] + " tail"), v4).backend_id == before[prompts[5]]
    v5 = view(0, 0, 0, 0, 0)
    after = {p: policy.choose(req(prompt=p), v5).backend_id for p in prompts}
    moved = [p for p in prompts if before[p] != after[p]]
    assert all(after[p] == "e" for p in moved)  # keys only move to the new backend
    assert 10 < len(moved) < 80  # about 1/5 of them
    assert set(before.values()) == set("abcd")


def test_consistent_hash_bounded_load_spills_hot_key():
    policy = build_policy("consistent_hash", {"load_factor": 1.25}, random.Random(0))
    r = req(session="hot")
    home = policy.choose(r, view(0, 0, 0, 0)).backend_id
    loads = {b: 0 for b in "abcd"}
    loads[home] = 6  # bound = ceil(1.25 * 7 / 4) = 3
    d = policy.choose(r, view(*loads.values()))
    assert d.backend_id != home and d.reason == "consistent_hash:spill"


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [("power_of_two", {"choices": 0}, "choices: must be >= 1"),
     ("session_affinity", {"ttl_s": "long"}, "policy.params.ttl_s: expected a number"),
     ("session_affinity", {"fallback": "rr"}, "fallback: expected least_loaded or hash"),
     ("consistent_hash", {"load_factor": 0.5}, "load_factor: must be >= 1"),
     ("random", {"x": 1}, "policy.params.x: unknown key")],
    ids=["p2-choices", "sa-ttl-type", "sa-fallback", "ch-load-factor", "random-unknown"],
)
def test_bad_params_name_the_key(name, params, message):
    with pytest.raises(ParamError, match=message):
        build_policy(name, params, random.Random(0))


def test_a_wrapper_passes_every_hook_of_the_policy_interface_through():
    """Every method of ``Policy`` reaches the inner policy through ``PolicyWrapper``: a hook
    added to the interface and not forwarded would fall to ``PolicyBase``'s no-op in the P/D
    decider, the parity check and replica sync alike."""
    import inspect

    from policies.base import PolicyWrapper
    from policies.types import Policy

    hooks = [n for n, v in vars(Policy).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert "on_peer_state" in hooks and "choose" in hooks
    calls: list[str] = []

    class Inner:
        name = "inner"

        def __getattr__(self, hook):
            return lambda *args: calls.append(hook)

    wrapper = PolicyWrapper(Inner())
    for hook in hooks:
        arity = len(inspect.signature(getattr(Policy, hook)).parameters) - 1
        getattr(wrapper, hook)(*([None] * arity))
        assert calls[-1:] == [hook], hook
    assert calls == hooks
    assert wrapper.name == "inner"


def test_the_synced_policy_defines_every_hook_itself():
    """``SyncedPolicy`` is not a ``PolicyWrapper`` (it must stay a compiled class): none of
    its hooks may be missing, which for a class with no base would fail only when called."""
    import inspect

    from policies.replica_sync import SyncedPolicy
    from policies.types import Policy

    hooks = [n for n, v in vars(Policy).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert [h for h in hooks if h not in vars(SyncedPolicy)] == []
