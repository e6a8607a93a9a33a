"""Load signals of existing engines, read from their Prometheus `/metrics`.

vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting`, KV-cache usage as
`vllm:kv_cache_usage_perc` (the older `vllm:gpu_cache_usage_perc` too, 0..1), and prefix-cache
hits (`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` counters, or the older
`vllm:gpu_prefix_cache_hit_rate`). llama.cpp's server: `llamacpp:requests_processing`,
`llamacpp:requests_deferred`, `llamacpp:kv_cache_usage_ratio` (gone from recent builds: the
cache usage is then None, and a proxy point estimates it from `/slots`, see `llama_server.py`).
Samples of several models or engines are summed (the cache usage is their maximum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")


@dataclass(frozen=True, slots=True)
class EngineSignals:
    engine: str  # "vllm" or "llama.cpp"
    running: int
    waiting: int
    cache_usage: float | None  # 0..1; None: the exposition has no cache gauge
    prefix_hit_rate: float | None


def parse(text: str) -> EngineSignals | None:
    """The signals in an engine's exposition, or None if it is not one grifo knows."""
    sums: dict[str, float] = {}
    peaks: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return None
    for family in families:
        for sample in family.samples:
            name = sample.name
            sums[name] = sums.get(name, 0.0) + sample.value
            peaks[name] = max(peaks.get(name, 0.0), sample.value)
    engine = "vllm" if any(k.startswith("vllm:") for k in sums) else None
    engine = engine or ("llama.cpp" if any(k.startswith("llamacpp:") for k in sums) else None)
    if engine is None:
        return None
    running = sum(_count(sums.get(n, 0.0)) for n in _RUNNING)
    waiting = sum(_count(sums.get(n, 0.0)) for n in _WAITING)
    cache = max((peaks[n] for n in _CACHE if n in peaks), default=None)
    hits, queries = (
        sums.get("vllm:prefix_cache_hits_total"),
        sums.get("vllm:prefix_cache_queries_total"),
    )
    rate = peaks.get("vllm:gpu_prefix_cache_hit_rate")
    if hits is not None and queries:
        rate = hits / queries
    usage = None if cache is None or math.isnan(cache) else min(max(cache, 0.0), 1.0)
    return EngineSignals(engine, running, waiting, usage, rate)


def _count(value: float) -> int:
    """A gauge as a count: NaN, infinite or negative values count as 0."""
    return int(value) if math.isfinite(value) and value > 0 else 0
