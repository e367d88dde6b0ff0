"""BackendSpeed: per-backend speed factors relative to the fleet, from first tokens."""

from __future__ import annotations

import random

import pytest

from policies.base import backend_speed_factors
from policies.kv_aware import create
from policies.prefill_cost import BackendSpeed
from policies.round_robin import create as create_round_robin


def speed(**kw: float) -> BackendSpeed:
    args = {"window": 32, "min_requests": 1, "band_ratio": 1.5, "max_ratio": 16.0,
            "memory_s": 60.0} | kw
    return BackendSpeed(int(args["window"]), int(args["min_requests"]), args["band_ratio"],
                        args["max_ratio"], args["memory_s"])


def feed(s: BackendSpeed, backend: str, ratio: float, n: int = 1,
         predicted_s: float = 0.05, now_s: float = 0.0) -> None:
    for _ in range(n):
        s.observe(backend, predicted_s, predicted_s * ratio, now_s)


def test_one_slow_backend_among_four_gets_its_slowdown() -> None:
    s = speed()
    for b in ("b1", "b2", "b3"):
        feed(s, b, 1.1, 3)
    feed(s, "b0", 4.4, 3)
    assert s.factor("b0", 0.0) == pytest.approx(4.0)
    assert [s.factor(b, 0.0) for b in ("b1", "b2", "b3")] == [1.0, 1.0, 1.0]
    assert s.factors() == {"b0": pytest.approx(4.0)}


def test_a_model_off_for_the_whole_fleet_moves_no_factor() -> None:
    s = speed()
    for b in ("b0", "b1", "b2"):
        feed(s, b, 2.6, 5)  # every TTFT 2.6x the model's: another GPU, not a slow backend
    assert s.factors() == {}


def test_with_two_backends_the_faster_is_the_reference() -> None:
    s = speed()
    feed(s, "b0", 1.0)
    feed(s, "b1", 3.0)
    assert (s.factor("b0", 0.0), s.factor("b1", 0.0)) == (1.0, pytest.approx(3.0))


def test_speeds_inside_the_band_count_as_equal_and_outside_are_clipped() -> None:
    s = speed(max_ratio=5.0)
    feed(s, "b0", 1.0)
    feed(s, "b1", 1.4)  # within 1.5x
    feed(s, "b2", 0.5)  # twice as fast
    feed(s, "b3", 40.0)
    assert s.factor("b1", 0.0) == 1.0
    assert s.factor("b2", 0.0) == pytest.approx(0.5)
    assert s.factor("b3", 0.0) == 5.0


def test_one_backend_heard_from_is_not_compared_and_min_requests_waits() -> None:
    s = speed(min_requests=3)
    feed(s, "b0", 4.0, 5)
    assert s.factors() == {}  # nothing to compare it with
    feed(s, "b1", 1.0, 2)
    assert s.factors() == {}  # b1 has 2 of 3
    feed(s, "b1", 1.0)
    assert s.factor("b0", 0.0) == pytest.approx(4.0)


def test_first_tokens_are_weighted_by_their_predicted_size() -> None:
    """A cached request's TTFT is mostly fixed overhead (network, the engine's tokenizer):
    ten of them 3x late weigh less than one long prefill on time."""
    s = speed()
    feed(s, "b0", 1.0, predicted_s=0.5)
    feed(s, "b1", 1.0, predicted_s=0.5)
    feed(s, "b1", 3.0, 10, predicted_s=0.005)
    # b1: (0.5 + 10 x 0.015) / (0.5 + 10 x 0.005) = 1.18, inside the band
    assert s.factors() == {}


def test_a_backend_that_recovers_returns_to_the_fleet() -> None:
    s = speed(window=8)
    feed(s, "b0", 1.0, 50)
    feed(s, "b1", 4.0, 5)
    assert s.factor("b1", 0.0) > 3.0
    feed(s, "b1", 1.0, 40)  # the throttling ended
    assert s.factor("b1", 0.0) == 1.0


@pytest.mark.parametrize(("predicted", "observed"),
                         [(0.0, 1.0), (-1.0, 1.0), (0.1, -0.5), (float("inf"), 1.0),
                          (0.1, float("nan")), (float("nan"), 0.1)])
def test_unusable_times_are_ignored(predicted: float, observed: float) -> None:
    s = speed()
    feed(s, "b0", 1.0)
    s.observe("b1", predicted, observed, 0.0)
    assert s.factors() == {}
    feed(s, "b1", 4.0)
    assert s.factor("b1", 0.0) == pytest.approx(4.0)  # the bad sample left no trace


def test_removing_a_backend_recomputes_the_reference() -> None:
    s = speed()
    feed(s, "b0", 1.0)
    feed(s, "b1", 4.0)
    s.remove_backend("b0")
    assert s.factors() == {}  # b1 alone has nothing to be slower than
    s.remove_backend("never-seen")


def test_a_factor_nothing_taught_for_memory_s_is_forgotten() -> None:
    """Priced as slow, a backend gets little work and teaches little: after memory_s without
    a first token it is offered work again, and its next first token says which it is."""
    s = speed(memory_s=60.0)
    feed(s, "b0", 1.0, now_s=0.0)
    feed(s, "b1", 4.0, now_s=10.0)
    assert s.factor("b1", 69.0) == pytest.approx(4.0)
    feed(s, "b0", 1.0, now_s=65.0)  # the others' first tokens do not keep b1's alive
    assert s.factor("b1", 70.5) == 1.0
    assert s.factors() == {}
    feed(s, "b1", 1.0, now_s=71.0)  # it recovered
    assert s.factor("b1", 72.0) == 1.0
    feed(s, "b1", 4.0, 3, now_s=80.0)  # or it did not
    assert s.factor("b1", 80.0) > 1.5


def test_heard_lists_every_backend_with_enough_first_tokens() -> None:
    s = speed(min_requests=2)
    feed(s, "b0", 1.0, 2)
    feed(s, "b1", 4.0, 2)
    feed(s, "b2", 1.0)  # one of two
    assert s.heard(0.0) == {"b0": 1.0, "b1": pytest.approx(4.0)}


def test_the_router_reads_factors_through_wrappers_and_from_policies_without() -> None:
    kv = create({}, random.Random(0))
    kv._speed.observe("b0", 0.05, 0.05, 0.0)
    kv._speed.observe("b1", 0.05, 0.2, 0.0)

    class Wrapper:  # as the disaggregation and replica-sync wrappers keep their policy
        def __init__(self, inner: object) -> None:
            self.inner = inner

    assert backend_speed_factors(Wrapper(Wrapper(kv)), 0.0) == {
        "b0": 1.0, "b1": pytest.approx(4.0)}
    assert backend_speed_factors(create_round_robin({}, random.Random(0)), 0.0) == {}


def test_the_median_follows_a_fleet_wide_drift_within_its_refresh() -> None:
    """Between recomputations of the median each first token moves only its own backend's
    factor; the median catches up within MEDIAN_EVERY first tokens."""
    s = speed(window=4)
    for b in ("b0", "b1", "b2"):
        feed(s, b, 1.0, 4)
    for _ in range(10):  # the whole fleet turns 3x slower than the model, one by one
        for b in ("b0", "b1", "b2"):
            feed(s, b, 3.0)
    assert s.factors() == {}
    feed(s, "b1", 40.0, 3)  # then one backend alone
    assert s.factor("b1", 0.0) > 2.0
