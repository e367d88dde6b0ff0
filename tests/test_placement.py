"""policies.placement: the home of a prefix is the backend that last received it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.placement import PlacementMemory


def test_home_is_the_latest_backend_of_the_deepest_recorded_block() -> None:
    memory = PlacementMemory(max_entries=100)
    memory.record("a", [1, 2, 3, 4])
    memory.record("b", [1, 2, 7])
    assert memory.home([1, 2, 3, 4, 5]) == ("a", 4)  # 4 was last seen on a
    assert memory.home([1, 2, 7, 8]) == ("b", 3)
    assert memory.home([1, 2]) == ("b", 2)  # b re-sent the shared head later
    assert memory.home([9, 10]) == (None, 0)  # (chained hashes: a block names its prefix)
    assert memory.home([]) == (None, 0)


def test_oldest_blocks_go_first_and_chains_stay_prefix_closed() -> None:
    memory = PlacementMemory(max_entries=6)
    memory.record("a", [1, 2, 3, 4])
    memory.record("b", [10, 11, 12, 13])
    # 8 blocks passed the budget of 6: the oldest go, down to 1/16 below it (5, at least 1)
    assert len(memory) == 5
    # a's tail went first, its head is still known
    assert memory.home([1, 2, 3, 4]) == ("a", 1)
    assert memory.home([10, 11, 12, 13]) == ("b", 4)
    memory.record("a", [1, 2])  # a's head again: now the newest, so b's tail goes next
    memory.record("c", [20, 21])  # 8 again: b's three deepest blocks go
    assert memory.home([1, 2]) == ("a", 2) and memory.home([20, 21]) == ("c", 2)
    assert memory.home([10, 11, 12, 13]) == ("b", 1)
    assert {b: memory.homed_blocks(b) for b in "abc"} == {"a": 2, "b": 1, "c": 2}


def test_removed_backends_are_no_ones_home() -> None:
    memory = PlacementMemory(max_entries=100)
    memory.record("a", [1, 2])
    memory.record("b", [5, 6])
    memory.remove_backend("a")
    assert memory.home([1, 2]) == (None, 0)
    assert memory.home([5, 6]) == ("b", 2)
    with pytest.raises(ValueError, match="max_entries"):
        PlacementMemory(0)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 12)), min_size=1, max_size=30))
def test_matches_a_naive_replay(dispatches: list[tuple[str, int]]) -> None:
    # Chains share heads: chain n is blocks 0..n-1 of one tree path.
    memory = PlacementMemory(max_entries=10_000)
    latest: dict[int, str] = {}
    for backend, length in dispatches:
        memory.record(backend, list(range(length)))
        for block in range(length):
            latest[block] = backend
    for length in range(1, 14):
        chain = list(range(length))
        depth = max((b + 1 for b in chain if b in latest), default=0)
        expected = (latest[depth - 1], depth) if depth else (None, 0)
        assert memory.home(chain) == expected


@given(st.lists(st.tuples(st.sampled_from("abc"), st.lists(st.integers(0, 20), max_size=8)),
                min_size=1, max_size=30), st.integers(1, 40))
def test_homed_blocks_count_each_backends_remembered_blocks(
    dispatches: list[tuple[str, list[int]]], max_entries: int
) -> None:
    memory = PlacementMemory(max_entries=max_entries)
    for backend, blocks in dispatches:
        memory.record(backend, list(dict.fromkeys(blocks)))
    memory.remove_backend("c")
    naive = {b: sum(1 for h in memory._home.values() if h == b) for b in "abc"}
    assert {b: memory.homed_blocks(b) for b in "abc"} == naive
