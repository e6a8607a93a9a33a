"""Passive outlier detection: a point that keeps failing is ejected and traffic moves."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.fabric import CHAT, Fabric
from tests.support.faulty import FaultyPoint


@pytest.fixture
def failing_point() -> Iterator[FaultyPoint]:
    """Healthy to probes, 500 to every inference request."""
    point = FaultyPoint("bad-lima", mode="error")
    yield point
    point.close()


def test_failing_point_is_retried_around_then_ejected(
    failing_point: FaultyPoint, tmp_path: Path
) -> None:
    topology = f"""
gateway: {{demo_keys: true, health_interval_s: 0.1,
          ejection: {{consecutive_failures: 3, base_s: 60}}}}
points:
  - {{name: bad-lima, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 1,
     url: "http://127.0.0.1:{failing_point.port}"}}
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 50,
     engine: {{kind: fake, embeddings: fake}}}}
tenants:
  - {{name: demo-global}}
"""
    fab = Fabric.from_yaml(topology, tmp_path)
    try:
        client = fab.client("demo-global")
        for _ in range(8):
            # The nearest point answers 500: retried on the next compliant point (nothing had
            # reached the client). After 3 failures it is ejected and no longer tried at all.
            raw = client.chat.completions.with_raw_response.create(
                model=CHAT, messages=[{"role": "user", "content": "x"}]
            )
            assert raw.headers["x-grifo-point"] == "lima-edge"
        assert failing_point.inference_requests == 3
        with pytest.raises(urllib.error.HTTPError) as ready:
            urllib.request.urlopen(f"{fab.url}/readyz", timeout=5)
        state = json.loads(ready.value.read())["points"]["bad-lima"]
        ready.value.close()
        assert state["ready"] is False
        assert state["reason"].startswith("ejected for 60 s")
    finally:
        fab.close()


def test_retry_budget() -> None:
    from grifo.dispatch.forward import RetryBudget

    budget = RetryBudget(ratio=0.2, min_concurrent=3)
    budget.active = 5
    assert [budget.acquire() for _ in range(4)] == [True, True, True, False]  # floor of 3
    budget.active, budget.retrying = 100, 0
    assert sum(budget.acquire() for _ in range(30)) == 20  # 20% of 100 in progress


def test_retries_never_leave_the_allowed_jurisdictions(tmp_path: Path) -> None:
    bad = FaultyPoint("bad-lima", jurisdiction="DE", mode="error")
    topology = f"""
gateway: {{demo_keys: true, health_interval_s: 0.1}}
points:
  - {{name: bad-lima, site: frankfurt, region: eu, jurisdiction: DE, tier: edge, rtt_ms: 1,
     url: "http://127.0.0.1:{bad.port}"}}
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 50,
     engine: {{kind: fake, embeddings: fake}}}}
tenants:
  - {{name: demo-eu, allowed_jurisdictions: [EU]}}
"""
    fab = Fabric.from_yaml(topology, tmp_path)
    try:
        before = fab.completed("lima-edge")
        client = fab.client("demo-eu")
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model=CHAT, messages=[{"role": "user", "content": "x"}]
                )
        assert bad.inference_requests == 2
        assert fab.completed("lima-edge") == before, "a retry crossed the border"
    finally:
        fab.close()
        bad.close()
