"""Deadlines: x-grifo-timeout-ms bounds the wait, stops the point, and is never a point failure."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.fabric import CHAT, Fabric, topology_yaml

EIGHT = [{"role": "user", "content": "one two three four five six seven eight"}]


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    engine = "{kind: fake, embeddings: fake, token_delay_ms: 100}"  # 8 words: 0.8 s
    fab = Fabric.from_yaml(topology_yaml(engine), tmp_path_factory.mktemp("deadlines"))
    yield fab
    fab.close()


def _idle(fab: Fabric, point: str) -> bool:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{fab.point_url(point)}/load", timeout=5) as resp:
            if json.loads(resp.read())["in_flight"] == 0:
                return True
        time.sleep(0.05)
    return False


def test_bad_timeout_header_is_400(slow: Fabric) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        slow.client("demo-eu").chat.completions.create(
            model=CHAT, messages=EIGHT, extra_headers={"x-grifo-timeout-ms": "soon"}
        )
    assert bad.value.body["param"] == "x-grifo-timeout-ms"  # type: ignore[index]


def test_missed_deadlines_are_504_cancel_the_point_and_eject_nothing(slow: Fabric) -> None:
    client = slow.client("demo-eu")
    for _ in range(6):  # more than the 5 failures that would eject a failing point
        with pytest.raises(openai.APIStatusError) as late:
            client.chat.completions.create(
                model=CHAT, messages=EIGHT, extra_headers={"x-grifo-timeout-ms": "250"}
            )
        assert late.value.status_code == 504
        assert late.value.code == "deadline_exceeded"
    assert _idle(slow, "frankfurt-regional"), "the point kept generating for nobody"
    ok = client.chat.completions.create(model=CHAT, messages=EIGHT)  # no deadline: completes
    assert ok.choices[0].message.content == EIGHT[0]["content"]


def test_a_stream_past_its_deadline_ends_in_band_and_bills_what_it_got(slow: Fabric) -> None:
    client = slow.client("demo-latam")
    with client.chat.completions.with_streaming_response.create(
        model=CHAT, messages=EIGHT, stream=True, extra_headers={"x-grifo-timeout-ms": "350"}
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert any('"deadline_exceeded"' in line for line in lines)
    entry = slow.ledger(request_id)[request_id]
    assert entry.status == "deadline_exceeded"
    assert entry.usage_source == "estimated"
    assert 0 < entry.completion_tokens < 8
    assert _idle(slow, "lima-edge")


def test_a_tenant_default_deadline_applies_without_the_header(tmp_path: Path) -> None:
    topology = """
gateway: {demo_keys: true, health_interval_s: 0.2}
points:
  - {name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 4,
     engine: {kind: fake, embeddings: fake, token_delay_ms: 100}}
tenants:
  - {name: hasty, timeout_ms: 250}
  - {name: patient}
"""
    fab = Fabric.from_yaml(topology, tmp_path)
    try:
        with pytest.raises(openai.APIStatusError) as late:
            fab.client("hasty").chat.completions.create(model=CHAT, messages=EIGHT)
        assert late.value.code == "deadline_exceeded"
        ok = fab.client("patient").chat.completions.create(model=CHAT, messages=EIGHT)
        assert ok.choices[0].finish_reason == "stop"
    finally:
        fab.close()
