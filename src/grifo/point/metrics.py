"""A point's Prometheus metrics: requests, tokens, and the GenAI server latencies measured at
the engine (its queue included)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class PointMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "grifo_point_requests",
            "Requests served",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "grifo_point_tokens", "Tokens processed", ["kind"], registry=self.registry
        )
        # The OpenTelemetry GenAI server metrics, measured at the engine (queue included).
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "gen_ai.server.request.duration at the point",
            ["gen_ai_request_model"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "gen_ai.server.time_to_first_token at the point",
            ["gen_ai_request_model"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "gen_ai.server.time_per_output_token at the point (after the first)",
            ["gen_ai_request_model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
