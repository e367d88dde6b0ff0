"""``router.hot_metrics`` exports exactly what prometheus-client's own families export for the
same updates (apart from prometheus-client's ``_created`` samples)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.hot_metrics import HotCounter, HotGauge, HotHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _exposition(registry: CollectorRegistry) -> list[str]:
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if "_created" not in line)


def test_same_exposition_as_prometheus_client():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counters = (HotCounter("t_requests", "Requests.", ["backend", "status"], ours),
                Counter("t_requests", "Requests.", ["backend", "status"], registry=theirs))
    gauges = (HotGauge("t_in_flight", "In flight.", ["backend"], ours),
              Gauge("t_in_flight", "In flight.", ["backend"], registry=theirs))
    histograms = (HotHistogram("t_seconds", "Durations.", ["backend"], ours, BUCKETS),
                  Histogram("t_seconds", "Durations.", ["backend"], buckets=BUCKETS,
                            registry=theirs))
    for counter in counters:
        counter.labels("a", "200").inc()
        counter.labels("a", "200").inc(2.5)
        counter.labels("b", "503").inc()
    for gauge in gauges:
        gauge.labels("a").inc()
        gauge.labels("a").inc()
        gauge.labels("a").dec()
        gauge.labels("b").set(7)
    for histogram in histograms:
        # Boundaries included: a value equal to a bound belongs to that bound's bucket.
        for value in (0.0005, 0.001, 0.0011, 0.5, 1.0, 3.0, 50.0):
            histogram.labels("a").observe(value)
    assert _exposition(ours) == _exposition(theirs)
    assert ours.get_sample_value("t_seconds_bucket", {"backend": "a", "le": "0.001"}) == 2
    assert ours.get_sample_value("t_requests_total", {"backend": "a", "status": "200"}) == 3.5


def test_counter_refuses_to_go_down():
    counter = HotCounter("t_c", "C.", ["x"], CollectorRegistry())
    with pytest.raises(ValueError):
        counter.labels("1").inc(-1)


@pytest.mark.parametrize("family", [HotCounter, HotGauge])
def test_a_name_taken_twice_is_refused_at_registration(family):
    # The registry finds a collector's names through ``describe``; without it two families
    # of one name would both export, and /metrics would show the name twice.
    registry = CollectorRegistry()
    family("kvrouter_taken", "first", ["backend"], registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        family("kvrouter_taken", "second", ["backend"], registry)


def test_a_histogram_name_taken_twice_is_refused_at_registration():
    registry = CollectorRegistry()
    HotHistogram("kvrouter_taken_seconds", "first", [], registry, buckets=(0.1, 1.0))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        HotHistogram("kvrouter_taken_seconds", "second", [], registry, buckets=(0.1, 1.0))
