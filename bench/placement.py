"""Placement decision time: the gateway's `PlacementIndex.rank` (best 3 candidates, as dispatch
uses it) over 100 and 10,000 points, median of many calls; gateway in-flight counts change
between calls, as they do under traffic.

Usage: python bench/placement.py
"""

from __future__ import annotations

import random
import statistics
import time

from grifo.config.model import ModelPrice, PlacementConfig, PointConfig, Prices
from grifo.jurisdictions import BLOCS
from grifo.placement.scoring import PlacementIndex
from grifo.topology import ModelCard, PointState, build_point_state

COUNTRIES = ["PE", "BR", "DE", "FR", "US", "ES", "CL", "AR"]


def topology(n: int, rng: random.Random) -> list[PointState]:
    points = []
    for i in range(n):
        config = PointConfig(
            name=f"p{i}",
            site=f"s{i}",
            region="r",
            jurisdiction=rng.choice(COUNTRIES),
            tier=rng.choice(["edge", "regional", "central"]),
            rtt_ms=rng.uniform(1, 200),
            url="http://127.0.0.1:1",
            prices=Prices(
                usd_per_hour=round(rng.uniform(0, 3), 2),
                default=ModelPrice(input_usd_per_1m=0.02, output_usd_per_1m=0.05),
            ),
        )
        point = build_point_state(config, "http://127.0.0.1:1")
        point.healthy = rng.random() > 0.1
        point.point_queued = rng.randrange(5)  # as its last load report said
        point.models = {"m": ModelCard("m", "chat", 2048)}
        points.append(point)
    return points


def measure(n: int, calls: int) -> float:
    rng = random.Random(n)
    points = topology(n, rng)
    allowed = BLOCS["EU"] | {"PE", "BR"}
    index = PlacementIndex(points, PlacementConfig())
    samples = []
    for i in range(calls):
        points[i % n].gateway_in_flight = i % 3
        start = time.perf_counter_ns()
        index.rank("m", allowed, 256, 3)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


if __name__ == "__main__":
    print("| points | median placement decision (µs) |\n|---:|---:|")
    for n, calls in ((100, 20_000), (10_000, 200)):
        print(f"| {n:,} | {measure(n, calls):,.1f} |")
