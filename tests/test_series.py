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


def test_gateway_metrics_update_the_series_of_each_label_set() -> None:
    """The gateway finds an answer's series once per label set; what it updates is what the
    label sets say, and a series shows only once it is updated."""
    from grifo.telemetry import metrics as gateway_metrics

    m = gateway_metrics.GatewayMetrics()
    chat = "/v1/chat/completions"
    for _ in range(2):
        m.observe(chat, "lima", "tiny", 200, (0.02, None), 4)  # whole answers: 5 ms a token
        m.meter("acme", "k1", "lima", "tiny", (10, 4), 7, chat)
    samples = _samples(m.registry)
    model = (("gen_ai_operation_name", "chat"), ("gen_ai_request_model", "tiny"), ("point", "lima"))
    requests = (("endpoint", chat), ("point", "lima"), ("status", "200"))
    assert samples[("grifo_requests_total", requests)] == 2
    assert samples[("gen_ai_server_request_duration_seconds_count", model)] == 2
    assert samples[("gen_ai_server_time_per_output_token_seconds_sum", model)] == 0.01
    assert not any(name.startswith("gen_ai_server_time_to_first") for name, _ in samples)
    assert samples[("grifo_cost_micros_total", (
        ("key", "k1"), ("model", "tiny"), ("point", "lima"), ("tenant", "acme")
    ))] == 14  # fmt: skip
    kind = (("kind", "completion"), ("model", "tiny"), ("point", "lima"))
    assert samples[("grifo_tokens_total", kind)] == 8
    m.observe(chat, "lima", "tiny", 200, (0.5, 0.1), 5)  # a stream, same label set
    m.observe(chat, "", "tiny", 503, (0.001, None), 0)  # refused before any point
    samples = _samples(m.registry)
    assert samples[("gen_ai_server_time_to_first_token_seconds_count", model)] == 1
    assert samples[("gen_ai_server_request_duration_seconds_count", model)] == 3
    refused = (("endpoint", chat), ("point", ""), ("status", "503"))
    assert samples[("grifo_requests_total", refused)] == 1
    assert not any(dict(labels).get("point") == "" for name, labels in samples if "gen_ai" in name)


def test_gateway_metrics_past_the_cached_label_sets_still_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from grifo.telemetry import metrics as gateway_metrics

    monkeypatch.setattr(gateway_metrics, "_MAX_CACHED", 1)
    m = gateway_metrics.GatewayMetrics()
    for model in ("a", "b", "b"):
        m.observe("/v1/chat/completions", "lima", model, 200, (0.01, None), 1)
        m.meter("acme", "k1", "lima", model, (1, 1), 1)
    samples = _samples(m.registry)
    for model, n in (("a", 1), ("b", 2)):
        labels = (("gen_ai_operation_name", "chat"), ("gen_ai_request_model", model))
        assert (
            samples[("gen_ai_server_request_duration_seconds_count", (*labels, ("point", "lima")))]
            == n
        )
        cost = (("key", "k1"), ("model", model), ("point", "lima"), ("tenant", "acme"))
        assert samples[("grifo_cost_micros_total", cost)] == n
