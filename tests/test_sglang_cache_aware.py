"""sglang_cache_aware reproduces sglang-router's cache_aware, weaknesses included."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.char_tree import CharTree
from policies.registry import build_policy
from policies.sglang_cache_aware import SglangCacheAware, create
from policies.types import BackendState, ClusterView, RouteRequest

IDS = ("w0", "w1", "w2", "w3")


def request(text: str, i: int = 0) -> RouteRequest:
    return RouteRequest(request_id=f"r{i}", model="m", prompt_tokens=len(text) // 4,
                        prompt_text=text)


def view(loads: dict[str, int] | None = None) -> ClusterView:
    loads = loads or {}
    return ClusterView(now_s=0.0, backends=tuple(
        BackendState(backend_id=b, in_flight_requests=loads.get(b, 0)) for b in IDS))


def prefix(group: int, chars: int = 2000) -> str:
    return "".join(chr(ord("a") + (group * 7 + i * i) % 26) for i in range(chars))


def policy(**params: object) -> SglangCacheAware:
    return create(params, random.Random(0))


def test_sequential_new_prefixes_all_collapse_onto_the_first_backend() -> None:
    sg = policy()
    for i in range(40):
        text = prefix(i % 8) + f" question {i}"
        decision = sg.choose(request(text, i), view())
        sg.on_dispatched(request(text, i), decision, float(i))
        assert decision.backend_id == "w0"


@pytest.mark.parametrize(
    ("shared_ratio", "expected"),
    [(0.9, "w2"), (0.35, "w2"), (0.25, "w0"), (0.0, "w0")],
    ids=["strong-match", "just-above-threshold", "just-below-threshold", "no-match"],
)
def test_match_rate_threshold(shared_ratio: float, expected: str) -> None:
    sg = policy()
    seen = prefix(1, 1000)
    sg.on_dispatched(request(seen), sg.choose(request(seen), view()), 0.0)  # lands on w0
    sg.tree.remove_tenant("w0")
    sg.tree.insert(seen, "w2", 1.0)
    shared = int(1000 * shared_ratio)
    text = seen[:shared] + "#" * (1000 - shared)
    assert sg.choose(request(text), view()).backend_id == expected


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ({"w0": 64, "w1": 0, "w2": 0, "w3": 0}, "w0"),  # gap 64 is not > 64: affinity kept
        ({"w0": 65, "w1": 0, "w2": 0, "w3": 0}, "w1"),  # imbalanced: least loaded, first of ties
        ({"w0": 300, "w1": 230, "w2": 230, "w3": 230}, "w0"),  # gap 70 but 300 < 1.5 * 230
        ({"w0": 400, "w1": 250, "w2": 230, "w3": 240}, "w2"),
    ],
    ids=["gap-at-threshold", "gap-over-threshold", "relative-not-exceeded", "both-exceeded"],
)
def test_balance_thresholds_drop_affinity_all_at_once(loads: dict[str, int], expected: str) -> None:
    sg = policy()
    text = prefix(3)
    sg.tree.insert(text, "w0", 0.0)
    assert sg.choose(request(text), view(loads)).backend_id == expected


def test_one_hot_prefix_spills_only_after_the_gap_passes_64() -> None:
    sg = policy()
    loads = dict.fromkeys(IDS, 0)
    sent: list[str] = []
    for i in range(200):  # a burst: nothing finishes
        text = prefix(5) + f" user {i}"
        decision = sg.choose(request(text, i), view(loads))
        sg.on_dispatched(request(text, i), decision, float(i))
        loads[decision.backend_id] += 1
        sent.append(decision.backend_id)
    assert sent[:65] == ["w0"] * 65
    assert sent[65] == "w1"
    counts = Counter(sent)
    assert counts["w0"] > 2 * counts["w3"]


def test_load_ignores_the_engines_own_queues() -> None:
    sg = policy()
    text = prefix(4)
    sg.tree.insert(text, "w1", 0.0)
    slow = ClusterView(now_s=0.0, backends=tuple(
        BackendState(backend_id=b, engine_waiting_requests=500 if b == "w1" else 0,
                     kv_usage_ratio=1.0 if b == "w1" else 0.1) for b in IDS))
    assert sg.choose(request(text), slow).backend_id == "w1"


def test_eviction_trims_each_backend_to_its_budget_by_lru() -> None:
    sg = policy(max_tree_chars=2500, eviction_interval_s=60.0)
    old, new = prefix(1), prefix(2)
    sg.on_dispatched(request(old), sg.choose(request(old), view()), 0.0)
    sg.on_dispatched(request(new), sg.choose(request(new), view()), 30.0)
    assert sg.tree.tenant_chars("w0") == 4000  # not trimmed before the interval
    sg.on_dispatched(request(new), sg.choose(request(new), view()), 61.0)
    assert sg.tree.tenant_chars("w0") <= 2500
    assert sg.tree.prefix_match(new)[0] == 2000
    assert sg.tree.prefix_match(old)[0] < 2000


def test_remove_backend_forgets_it() -> None:
    sg = policy()
    text = prefix(6)
    sg.tree.insert(text, "w3", 0.0)
    sg.on_backend_removed("w3")
    assert sg.tree.prefix_match(text) == (0, None)
    assert sg.tree.tenant_chars("w3") == 0


def test_registry_builds_it() -> None:
    built = build_policy("sglang_cache_aware", {"cache_threshold": 0.5}, random.Random(1))
    assert isinstance(built, SglangCacheAware) and built.params.cache_threshold == 0.5


texts = st.text(alphabet="abc", max_size=12)


@settings(max_examples=60, deadline=None)
@given(inserts=st.lists(st.tuples(texts, st.sampled_from(IDS)), max_size=12), query=texts)
def test_tree_matches_the_longest_inserted_prefix(
    inserts: list[tuple[str, str]], query: str
) -> None:
    tree = CharTree()
    for i, (text, tenant) in enumerate(inserts):
        tree.insert(text, tenant, float(i))
    best = max((len(_common(text, query)) for text, _ in inserts), default=0)
    matched, tenant = tree.prefix_match(query)
    assert matched == best
    if best:
        assert any(t == tenant and len(_common(text, query)) >= best for text, t in inserts)
    for owner in IDS:  # char counts equal the distinct prefixes of what each tenant inserted
        mine = {text[:k] for text, t in inserts if t == owner for k in range(1, len(text) + 1)}
        assert tree.tenant_chars(owner) == len(mine)


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
