"""`serve --workers N`: one scrape merges every worker's metrics by what each one means."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from grifo.telemetry.peers import merge


def _worker(served: int, up: int, in_flight: int, latencies: list[float]) -> str:
    registry = CollectorRegistry()
    requests = Counter("grifo_requests", "Requests", ["point"], registry=registry)
    requests.labels("lima").inc(served)
    Gauge("grifo_point_up", "Up", ["point"], registry=registry).labels("lima").set(up)
    Gauge("grifo_point_in_flight", "In flight", ["point"], registry=registry).labels("lima").set(
        in_flight
    )
    histogram = Histogram("gen_ai_server_request_duration_seconds", "Latency", registry=registry)
    for seconds in latencies:
        histogram.observe(seconds)
    return generate_latest(registry).decode()


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_counters_and_histograms_add_up_and_gauges_follow_their_meaning() -> None:
    merged = _samples(
        merge([_worker(3, 1, 2, [0.01, 0.2]), _worker(4, 0, 5, [0.3])], workers=2, missing=1)
    )
    lima = (("point", "lima"),)
    assert merged[("grifo_requests_total", lima)] == 7
    assert merged[("grifo_point_up", lima)] == 0  # up only if every worker sees it up
    assert merged[("grifo_point_in_flight", lima)] == 7
    assert merged[("gen_ai_server_request_duration_seconds_count", ())] == 3
    assert merged[("gen_ai_server_request_duration_seconds_sum", ())] == 0.51
    assert merged[("gen_ai_server_request_duration_seconds_bucket", (("le", "0.25"),))] == 2
    assert merged[("grifo_scrape_workers", (("state", "merged"),))] == 2
    assert merged[("grifo_scrape_workers", (("state", "missing"),))] == 1
    created = [v for (name, _), v in merged.items() if name == "grifo_requests_created"]
    assert len(created) == 1  # one series, the earliest start, not a sum of timestamps
    assert created[0] < 2 * 10**9
