"""One consistent `/metrics` from `grifo serve --workers N`.

The kernel hands a scrape to any one of the worker processes sharing the port, and each counts
only what it served. So every worker also listens on a private loopback port, named in
`<state>/workers/<pid>.port`; the worker that gets a scrape asks the others for their own
exposition there and merges all into one: counters and histograms are summed, `_created`
timestamps take the earliest, and gauges follow what they mean (`GAUGES`): a point is up only if
every worker sees it up, in-flight requests and learned limits add up, a budget reads the same
everywhere. A worker that does not answer within `TIMEOUT_S` is left out and counted in
`grifo_scrape_workers{state="missing"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from grifo.errors import GrifoError
from grifo.http.client import ConnectionPool

TIMEOUT_S = 2.0
Combine = Callable[[float, float], float]
GAUGES: dict[str, Combine] = {
    "grifo_point_up": min,
    "grifo_store_up": min,
    "grifo_point_ejected": max,
    "grifo_budget_micros": max,
    "grifo_budget_exhaustion_timestamp_seconds": max,
    "grifo_point_heartbeat_age_seconds": max,
}  # any other gauge is summed (in flight, waiting, learned limits, spool backlog)


class Peers:
    """The other workers of this gateway, found through the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "workers"
        self._own: Path | None = None

    def register(self, port: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._own = self.directory / f"{os.getpid()}.port"
        self._own.write_text(str(port))

    def unregister(self) -> None:
        if self._own is not None:
            self._own.unlink(missing_ok=True)

    def ports(self) -> list[int]:
        ports = []
        for path in self.directory.glob("*.port"):
            if path == self._own:
                continue
            with contextlib.suppress(OSError, ValueError):
                ports.append(int(path.read_text()))
        return ports

    async def expositions(self) -> tuple[list[str], int]:
        """The other workers' own metrics, and how many did not answer."""
        results = await asyncio.gather(*(_fetch(port) for port in self.ports()))
        texts = [text for text in results if text is not None]
        return texts, len(results) - len(texts)


async def _fetch(port: int) -> str | None:
    pool = ConnectionPool("127.0.0.1", port, connect_timeout_s=TIMEOUT_S)
    try:
        response = await pool.request("GET", "/metrics", head_timeout_s=TIMEOUT_S)
        body = await asyncio.wait_for(response.read(), TIMEOUT_S)
        return body.decode() if response.status == 200 else None
    except (GrifoError, TimeoutError, OSError):
        return None
    finally:
        await pool.close()


def merge(texts: Iterable[str], workers: int, missing: int) -> bytes:
    """One exposition from several workers' (see the module docstring)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            combine = _combine(family)
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                combine_sample = min if sample.name.endswith("_created") else combine
                seen = samples.get(key)
                samples[key] = sample.value if seen is None else combine_sample(seen, sample.value)
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    scrape = GaugeMetricFamily(
        "grifo_scrape_workers",
        "Gateway worker processes in this scrape: merged, or missing (did not answer)",
        labels=["state"],
    )
    scrape.add_metric(["merged"], workers)
    scrape.add_metric(["missing"], missing)
    families[scrape.name] = scrape
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


def _combine(family: Metric) -> Combine:
    if family.type == "gauge":
        return GAUGES.get(family.name, _sum)
    return _sum


def _sum(a: float, b: float) -> float:
    return a + b


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
