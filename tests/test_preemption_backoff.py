"""The KV hold backs off on engine preemptions: the counter's rise lowers a backend's ratio,
time restores it, a reset counter is a restart, and kv_aware holds by the lowest ratio."""

from __future__ import annotations

import random

import pytest

from policies.bookkeeping import BackendLoad, EngineSignals
from policies.kv_aware import create
from policies.params import ParamError
from policies.preemption_backoff import PreemptionBackoff
from policies.types import BackendState, ClusterView, RouteRequest


def seen(total: int | None, backend_id: str = "b0") -> BackendState:
    return BackendState(backend_id=backend_id, engine_preemptions_total=total)


def backoff(backoff_ratio: float = 0.5, recovery_s: float = 100.0) -> PreemptionBackoff:
    return PreemptionBackoff(0.9, 0.3, backoff_ratio, recovery_s)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((5,), 0.9),  # the first value is a baseline: when those preemptions were is unknown
        ((5, 5, 5), 0.9),
        ((5, 6), 0.45),
        ((5, 6, 7), 0.3),  # 0.225, floored
        ((5, None, 5), 0.9),  # an unknown (stale) counter changes nothing
        ((5, None, 6), 0.45),
        ((10, 2), 0.45),  # went down: the engine restarted and preempted twice since
        ((10, 0), 0.9),  # restarted, nothing since
        ((10, 0, 1), 0.45),  # ... and the restart's value is the new baseline
    ],
    ids=["baseline", "flat", "one-rise", "floor", "unknown-flat", "unknown-then-rise",
         "reset-with-preemptions", "reset-clean", "reset-then-rise"],
)
def test_a_rising_counter_backs_the_ratio_off(counts: tuple[int | None, ...],
                                              expected: float) -> None:
    b = backoff()
    for total in counts:
        b.observe(seen(total), 10.0)
    assert b.ratio("b0", 10.0) == pytest.approx(expected)


def test_one_view_seen_twice_is_one_observation_and_backends_are_apart() -> None:
    b = backoff()
    b.observe(seen(1), 0.0)
    b.observe(seen(0, "b1"), 0.0)
    for _ in range(3):
        b.observe(seen(2), 1.0)
    assert b.ratio("b0", 1.0) == pytest.approx(0.45)
    assert b.ratio("b1", 1.0) == 0.9


def test_the_ratio_climbs_back_linearly_and_returns_exactly_to_the_ceiling() -> None:
    b = backoff(backoff_ratio=0.2, recovery_s=100.0)
    b.observe(seen(0), 0.0)
    b.observe(seen(3), 10.0)  # to the floor
    assert b.ratio("b0", 10.0) == pytest.approx(0.3)
    assert b.ratio("b0", 60.0) == pytest.approx(0.6)  # half of 0.3 -> 0.9 in half of 100 s
    b.observe(seen(4), 60.0)  # preempts again: backs off from where it had climbed to
    assert b.ratio("b0", 60.0) == pytest.approx(0.3)
    assert b.ratio("b0", 159.0) == pytest.approx(0.894)
    assert b.ratio("b0", 160.0) == 0.9  # exactly: as if it never preempted
    b.remove_backend("b0")
    b.observe(seen(9), 200.0)  # forgotten: a baseline again
    assert b.ratio("b0", 200.0) == 0.9


@pytest.mark.parametrize(("backoff_ratio", "recovery_s"), [(1.0, 100.0), (0.5, 0.0)],
                         ids=["no-backoff", "no-recovery"])
def test_it_turns_off(backoff_ratio: float, recovery_s: float) -> None:
    b = backoff(backoff_ratio, recovery_s)
    b.observe(seen(0), 0.0)
    b.observe(seen(50), 1.0)
    assert b.ratio("b0", 1.0) == 0.9


def test_a_scrape_without_capacity_keeps_the_counter() -> None:
    load = BackendLoad(backend_id="b0")
    load.scraped(EngineSignals(total_kv_blocks=1000, block_size=16, preemptions_total=3), 0.0)
    load.scraped(EngineSignals(preemptions_total=4), 1.0)  # capacity carried over
    state = load.state(1.0, max_age_s=5.0)
    assert (state.total_kv_blocks, state.engine_preemptions_total) == (1000, 4)


def _request(i: int, tokens: int) -> RouteRequest:
    return RouteRequest(request_id=f"r{i}", model="m", prompt_tokens=tokens, block_size=16)


def test_kv_aware_holds_by_the_lowest_ratio_while_an_engine_preempts() -> None:
    # Two backends of 16,000 tokens, 6,016 committed on each: room for 2,000 more within 0.9
    # of it, none within 0.3. The hold is fleet-wide (it binds only when no backend has room), so one
    # engine's preemptions lower the ratio for all: they say the commitment is optimistic.
    kv = create({"hold_queue_s": 0.0, "hold_kv_backoff_ratio": 0.33,
                 "hold_kv_recovery_s": 300.0}, random.Random(0))

    def view(now_s: float, b0_total: int) -> ClusterView:
        return ClusterView(now_s=now_s, backends=(
            BackendState(backend_id="b0", total_kv_blocks=1000, engine_preemptions_total=b0_total),
            BackendState(backend_id="b1", total_kv_blocks=1000, engine_preemptions_total=0)))

    for i, backend in enumerate(view(0.0, 0).backends):
        request, v = _request(i, 6000), ClusterView(now_s=0.0, backends=(backend,))
        assert not kv.defer(request, v)  # an empty backend always has room
        kv.on_dispatched(request, kv.choose(request, v), 0.0)
    small = _request(9, 2000)
    assert not kv.defer(small, view(1.0, 0))  # nobody preempts: today's 0.9
    assert kv.defer(small, view(2.0, 1))  # b0 preempted once: 0.3 everywhere
    assert kv.defer(small, view(100.0, 1))  # 0.496 after 98 s: 8,016 > 7,936
    assert not kv.defer(small, view(200.0, 1))  # 0.696: 8,016 <= 11,136
    assert not kv.defer(small, view(201.0, 0))  # b0 restarted, no preemption since
    assert kv.defer(small, view(202.0, 2))  # ... then two: back to the floor
    kv.on_backend_removed("b0")  # its history goes with it: b1 alone never preempted
    assert not kv.defer(small, ClusterView(now_s=203.0, backends=(
        BackendState(backend_id="b1", total_kv_blocks=1000, engine_preemptions_total=0),)))


@pytest.mark.parametrize(
    ("key", "value"),
    [("hold_kv_floor_ratio", -0.1), ("hold_kv_backoff_ratio", 0.0),
     ("hold_kv_backoff_ratio", 1.5), ("hold_kv_recovery_s", -1.0)],
)
def test_bad_backoff_params_name_their_key(key: str, value: float) -> None:
    with pytest.raises(ParamError, match=key):
        create({key: value}, random.Random(0))
