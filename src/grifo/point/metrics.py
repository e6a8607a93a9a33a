"""A point's Prometheus metrics: requests, tokens, the GenAI server latencies measured at the
engine (its queue included), and what a batching engine does with its slots."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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

    def watch_engine(self, engine: EngineStats) -> None:
        self.registry.register(_EngineCollector(engine))


@runtime_checkable
class EngineStats(Protocol):
    """What a batching llama.cpp engine counts (`engines.batching`)."""

    threads: int
    gpu_layers: int
    reused_tokens: int
    prefix_copies: int
    gap_moves: int


class _EngineCollector(Collector):
    def __init__(self, engine: EngineStats) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        yield GaugeMetricFamily(
            "grifo_point_engine_threads", "Threads the engine decodes with", engine.threads
        )
        yield GaugeMetricFamily(
            "grifo_point_engine_gpu_layers",
            "Model layers the engine runs on the GPU (0: all on the CPU)",
            engine.gpu_layers,
        )
        yield CounterMetricFamily(
            "grifo_point_engine_reused_prompt_tokens",
            "Prompt tokens taken from a slot's cached prefix instead of computed",
            engine.reused_tokens,
        )
        copies = CounterMetricFamily(
            "grifo_point_engine_cache_copies",
            "Cache streams copied to keep the running slots one run: a reused prefix copied "
            "beside them, or a running sequence moved into a gap",
            labels=["reason"],
        )
        copies.add_metric(["prefix"], engine.prefix_copies)
        copies.add_metric(["gap"], engine.gap_moves)
        yield copies
