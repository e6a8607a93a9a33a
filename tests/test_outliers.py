"""Latency outliers: a point far slower per token than its peers is ejected."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

from grifo.admission.shedding import GradientLimit
from grifo.config.model import AdmissionConfig, EjectionConfig, PointConfig
from grifo.dispatch.outliers import eject_slow_points
from grifo.topology import ModelCard, PointState, build_point_state
from tests.support.fabric import CHAT, Fabric

EJECTION = EjectionConfig(latency_factor=3.0, base_s=30)


def _fleet(
    per_token_s: dict[str, float], tier: str = "edge"
) -> tuple[list[PointState], dict[str, GradientLimit]]:
    points, limits = [], {}
    for i, (name, seconds) in enumerate(per_token_s.items()):
        config = PointConfig(name=name, site="s", region="r", jurisdiction="PE", tier=tier)  # type: ignore[arg-type]
        point = build_point_state(config, f"http://127.0.0.1:{9100 + i}")
        point.healthy = True
        point.set_models({"m": ModelCard("m", "chat", 2048)})
        limit = GradientLimit(AdmissionConfig())
        for _ in range(10):
            limit.observe(seconds, in_flight=1)
        points.append(point)
        limits[name] = limit
    return points, limits


def test_the_slow_point_among_three_is_ejected_for_a_while() -> None:
    points, limits = _fleet({"a": 0.010, "b": 0.012, "slow": 0.050})
    now = time.monotonic()
    ejected = eject_slow_points(points, limits, EJECTION, now)
    assert [p.name for p in ejected] == ["slow"]
    slow = points[2]
    assert not slow.healthy
    assert slow.ejected(now + 29)
    assert not slow.ejected(now + 31)
    assert "per token" in slow.reason
    assert all(p.healthy for p in points[:2])


def test_no_verdict_without_enough_peers_or_when_off() -> None:
    points, limits = _fleet({"a": 0.010, "slow": 0.100})
    assert eject_slow_points(points, limits, EJECTION) == []
    points, limits = _fleet({"a": 0.010, "b": 0.010, "slow": 0.100})
    assert eject_slow_points(points, limits, EjectionConfig()) == []  # off by default
    assert all(p.healthy for p in points)


def test_a_point_is_judged_only_against_its_tier_and_recent_traffic() -> None:
    edge, edge_limits = _fleet({"a": 0.010, "b": 0.010}, tier="edge")
    central, central_limits = _fleet({"c": 0.100}, tier="central")
    limits = edge_limits | central_limits
    assert eject_slow_points(edge + central, limits, EJECTION) == []
    points, limits = _fleet({"a": 0.010, "b": 0.010, "slow": 0.100})
    later = time.monotonic() + 60  # nothing heard from any of them for a minute
    assert eject_slow_points(points, limits, EJECTION, later) == []


def test_a_gateway_ejects_the_slow_point_after_real_traffic(tmp_path: Path) -> None:
    def point(name: str, delay_ms: int) -> str:
        engine = f"{{kind: fake, embeddings: fake, token_delay_ms: {delay_ms}}}"
        return (
            f"  - {{name: {name}, site: lima, region: sa-west, jurisdiction: PE, tier: edge, "
            f"engine: {engine}}}\n"
        )

    topology = (
        "gateway: {demo_keys: true, health_interval_s: 0.1, ejection: {latency_factor: 3}}\n"
        "points:\n"
        + point("fast-1", 2)
        + point("fast-2", 2)
        + point("slow", 40)
        + "tenants:\n  - {name: demo-peru, allowed_jurisdictions: [PE]}\n"
    )
    fab = Fabric.from_yaml(topology, tmp_path)
    try:
        client = fab.client("demo-peru")
        words = " ".join(f"w{i}" for i in range(8))

        def ask(_: int) -> str:
            raw = client.chat.completions.with_raw_response.create(
                model=CHAT, messages=[{"role": "user", "content": words}]
            )
            return raw.headers["x-grifo-point"]

        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            served = list(pool.map(ask, range(27)))
        assert "slow" in served  # concurrent load reached every point
        deadline = time.monotonic() + 5
        states = {p.name: p for p in fab.running.gateway.points}
        while states["slow"].healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not states["slow"].healthy
        assert "per token" in states["slow"].reason
        assert states["fast-1"].healthy
        assert states["fast-2"].healthy
    finally:
        fab.close()
