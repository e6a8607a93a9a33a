"""Agent runs at the site that holds the data: each point searches its own documents, and a
run placed by a tenant's jurisdictions never sees another site's data (real processes, fake
engine and embeddings)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grifo.agent.tools.index import build_index
from grifo.point.engines.fake import FakeEmbedder
from tests.support.fabric import CHAT, Fabric
from tests.test_agent_runs import events_of, post

LIMA_DOC = "Lima reservoir level is 71 percent; the Rimac intake runs at night."
FRANKFURT_DOC = "Frankfurt grid load peaks at 18:00; the Main substation is on standby."


def _index(root: Path, name: str, text: str) -> Path:
    docs = root / f"{name}-docs"
    docs.mkdir()
    (docs / "notes.md").write_text(text)
    index = root / f"{name}.db"
    build_index(docs, index, FakeEmbedder())
    return index


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    root = tmp_path_factory.mktemp("sites")
    lima = _index(root, "lima", LIMA_DOC)
    frankfurt = _index(root, "frankfurt", FRANKFURT_DOC)
    engine = "{kind: fake, embeddings: fake}"
    yaml = f"""
gateway: {{demo_keys: true, health_interval_s: 0.2}}
points:
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 4,
     engine: {engine},
     tools: {{vector: [{{index: "{lima}"}}],
             http: [{{name: us_forecast, description: Forecast from a US provider.,
                     url: "http://127.0.0.1:9/forecast", private: true, jurisdiction: US}}]}},
     prices: {{usd_per_hour: 0.04, default: {{input_usd_per_1m: 20, output_usd_per_1m: 40}}}}}}
  - {{name: frankfurt-regional, site: frankfurt, region: eu-central, jurisdiction: DE,
     tier: regional, rtt_ms: 110, engine: {engine},
     tools: {{vector: [{{index: "{frankfurt}"}}]}}}}
  - {{name: virginia-central, site: virginia, region: us-east, jurisdiction: US, tier: central,
     rtt_ms: 70, engine: {engine}}}
tenants:
  - {{name: demo-eu, allowed_jurisdictions: [EU]}}
  - {{name: demo-latam, allowed_jurisdictions: [PE, BR]}}
  - {{name: demo-global}}
"""
    fab = Fabric.from_yaml(yaml, root / "state")
    yield fab
    fab.close()


def _run(fabric: Fabric, tenant: str, text: str, **extra: Any) -> tuple[Any, list[Any]]:
    body = {
        "model": CHAT,
        "input": text,
        "tools": ["search_documents"],
        "tool_choice": "required",
        "limits": {"max_steps": 2},
        **extra,
    }
    response = post(fabric, tenant, body)
    assert response.status_code == 200, response.text
    return response, events_of(response)


def test_a_run_searches_the_documents_of_the_site_it_runs_at(sites: Fabric) -> None:
    response, events = _run(sites, "demo-latam", "reservoir level")
    assert response.headers["x-grifo-point"] == "lima-edge"
    kinds = [e["type"] for e in events]
    assert kinds == [
        "run.started", "model.step", "tool.call", "tool.result", "model.step", "run.completed"
    ]  # fmt: skip
    assert events[2]["arguments"] == {"query": "reservoir level"}
    assert events[3]["sources"] == ["notes.md#0"]
    assert LIMA_DOC in events[3]["output"]
    assert LIMA_DOC in events[-1]["output"]  # the fake engine answers with the tool result


def test_every_step_is_audited_and_the_run_metered_once(sites: Fabric) -> None:
    response, events = _run(sites, "demo-latam", "Rimac intake")
    request_id = response.headers["x-request-id"]
    records = sites.audit_records(request_id, 4)
    assert [r.status for r in records] == [
        "step:1:model",
        "step:1:tool:search_documents",
        "step:2:model",
        "ok",
    ]
    steps = [e for e in events if e["type"] == "model.step"]
    assert [(r.prompt_tokens, r.completion_tokens) for r in records[::2]] == [
        (s["step_usage"]["prompt_tokens"], s["step_usage"]["completion_tokens"]) for s in steps
    ]
    assert {r.point for r in records} == {"lima-edge"}
    assert sum(r.cost_micros for r in records) == records[-1].cost_micros > 0
    run = records[-1]
    assert run.prompt_tokens == events[-1]["usage"]["prompt_tokens"]
    assert records[1].output_hmac not in ("", records[0].output_hmac)  # the tool's own output
    ledger = sites.ledger(request_id)
    assert len(ledger) == 1
    assert ledger[request_id].cost_micros == run.cost_micros


def test_data_of_one_site_never_reaches_a_run_placed_elsewhere(sites: Fabric) -> None:
    for tenant, point, own, foreign in [
        ("demo-eu", "frankfurt-regional", FRANKFURT_DOC, LIMA_DOC),
        ("demo-latam", "lima-edge", LIMA_DOC, FRANKFURT_DOC),
    ]:
        for query in ("reservoir level", "grid load", "Lima", "Frankfurt"):
            response, events = _run(sites, tenant, query)
            assert response.headers["x-grifo-point"] == point
            text = json.dumps(events)
            assert own in text
            assert foreign not in text


def test_a_run_needing_a_tool_its_allowed_sites_lack_goes_nowhere(sites: Fabric) -> None:
    body = {"model": CHAT, "input": "x", "tools": ["search_documents"], "tool_choice": "required"}
    response = post(sites, "demo-global", body, **{"x-grifo-tier": "central"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_compliant_point"


def test_a_tool_processing_abroad_is_only_for_runs_allowed_there(sites: Fabric) -> None:
    body = {"model": CHAT, "input": "x", "tools": ["us_forecast"], "tool_choice": "none"}
    refused = post(sites, "demo-latam", body)  # PE and BR only: the tool sends data to the US
    assert refused.status_code == 503
    assert "allowed jurisdictions" in refused.json()["error"]["message"]
    allowed = post(sites, "demo-global", body)
    assert allowed.status_code == 200
    assert allowed.headers["x-grifo-point"] == "lima-edge"  # the only point offering it


def test_a_point_refuses_a_tool_it_does_not_offer(sites: Fabric) -> None:
    import urllib.error
    import urllib.request

    body = json.dumps({"model": CHAT, "input": "x", "tools": ["http_fetch"]}).encode()
    url = sites.point_url("lima-edge") + "/v1/grifo/agent-runs"
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400
    error = json.loads(refused.value.read())["error"]
    assert error["code"] == "tool_not_available"
    assert "http_fetch" in error["message"]
