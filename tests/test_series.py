"""The request path's counters and histograms expose what prometheus_client's own would."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from grifo.telemetry import series

BUCKETS = (0.01, 0.1, 1.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_same_exposition_as_prometheus_client_for_the_same_updates() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counters = (
        series.Counter("grifo_requests", "Requests", ["point", "status"], registry=ours),
        prometheus_client.Counter(
            "grifo_requests", "Requests", ["point", "status"], registry=theirs
        ),
    )
    histograms = (
        series.Histogram("latency_seconds", "Latency", ["point"], buckets=BUCKETS, registry=ours),
        prometheus_client.Histogram(
            "latency_seconds", "Latency", ["point"], buckets=BUCKETS, registry=theirs
        ),
    )
    for counter in counters:
        counter.labels("lima", "200").inc()
        counter.labels("lima", "200").inc(2.5)
        counter.labels("bonn", "503").inc()
    for histogram in histograms:
        for value in (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 7.0):  # on and between the bounds
            histogram.labels("lima").observe(value)
        histogram.labels("bonn").observe(0.2)
    assert _samples(ours) == _samples(theirs)
    lima = (("le", "0.1"), ("point", "lima"))
    assert _samples(ours)[("latency_seconds_bucket", lima)] == 4  # cumulative, le inclusive
    created = [s for f in ours.collect() for s in f.samples if s.name.endswith("_created")]
    assert len(created) == 2  # one per counter child, as prometheus_client's


def test_wrong_labels_and_decreasing_counters_are_refused() -> None:
    counter = series.Counter("c", "C", ["point"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        counter.labels("a", "b")
    with pytest.raises(ValueError, match="only go up"):
        counter.labels("a").inc(-1)
