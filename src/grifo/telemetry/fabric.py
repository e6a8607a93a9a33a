"""The fabric's live state as operators see it: each point's health, ejection, concurrency
limit and load, and what dispatch and admission did. Read by `/admin/points` and `/metrics`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from grifo.service import Gateway


def point_states(gateway: Gateway) -> list[dict[str, Any]]:
    """One row per point, as `/admin/points` shows them."""
    now = time.monotonic()
    rows = []
    for point in gateway.points:
        ejected_s = max(0.0, point.ejected_until - now)
        limit = None if gateway.admission is None else gateway.admission.limits[point.name]
        rows.append(
            {
                "name": point.name,
                "site": point.config.site,
                "region": point.config.region,
                "jurisdiction": point.jurisdiction,
                "tier": point.config.tier,
                "state": "ejected" if ejected_s else ("up" if point.healthy else "down"),
                "reason": point.reason,
                "ejected_for_s": round(ejected_s, 3),
                "times_ejected": point.ejections,
                "consecutive_failures": point.failures,
                "in_flight": point.gateway_in_flight,
                "queued_at_point": point.queued,
                "concurrency_limit": None if limit is None else int(limit.limit),
                "answer_p95_ms": _p95_ms(point.answer_s),
                "first_token_p95_ms": _p95_ms(point.first_token_s),
                "models": sorted(point.models),
                "source": point.source,  # static (configured) or registered (joined)
                "last_heartbeat_ms": point.heartbeat_ms,  # registered points only
            }
        )
    return rows


def _p95_ms(window: Any) -> float | None:
    return round(window.quantile(0.95) * 1000, 3) if len(window) else None


class FabricCollector(Collector):
    """Prometheus families read from the gateway's state at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self._gateway
        now = time.monotonic()
        ejected = GaugeMetricFamily(
            "grifo_point_ejected",
            "1 while passive outlier detection keeps the point out",
            labels=["point"],
        )
        ejections = CounterMetricFamily(
            "grifo_point_ejections", "Times the point was ejected", labels=["point"]
        )
        limit = GaugeMetricFamily(
            "grifo_point_concurrency_limit",
            "Requests this gateway process lets the point hold at once (learned)",
            labels=["point"],
        )
        in_flight = GaugeMetricFamily(
            "grifo_point_in_flight",
            "Requests this gateway process has at the point",
            labels=["point"],
        )
        for point in gateway.points:
            ejected.add_metric([point.name], 1.0 if point.ejected(now) else 0.0)
            ejections.add_metric([point.name], point.ejections)
            in_flight.add_metric([point.name], point.gateway_in_flight)
            if gateway.admission is not None:
                limit.add_metric([point.name], int(gateway.admission.limits[point.name].limit))
        yield from (ejected, ejections, limit, in_flight)
        counts = gateway.dispatcher.counts
        retries = CounterMetricFamily(
            "grifo_dispatch_retries",
            "Attempts moved to another compliant point before the client got a byte, by why",
            labels=["reason"],
        )
        for reason, n in sorted(counts.retries.items()):
            retries.add_metric([reason], n)
        hedges = CounterMetricFamily(
            "grifo_dispatch_hedges",
            "Hedged copies: sent, won (answered first), lost, denied (no retry budget)",
            labels=["outcome"],
        )
        for outcome, n in counts.hedges.items():
            hedges.add_metric([outcome], n)
        yield from (retries, hedges)
        if gateway.admission is not None:
            shed = CounterMetricFamily(
                "grifo_admission_shed", "Requests shed with 503 + retry-after", labels=["reason"]
            )
            for reason, n in gateway.admission.shed.items():
                shed.add_metric([reason], n)
            waiting = GaugeMetricFamily(
                "grifo_admission_waiting", "Requests waiting for a point's concurrency slot"
            )
            waiting.add_metric([], gateway.admission.waiting)
            yield from (shed, waiting)
