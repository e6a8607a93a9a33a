"""The gateway over real point processes (fake engines), through the official OpenAI SDK."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from grifo.store.records import LedgerEntry
from tests.support.fabric import CHAT, EMBED, Fabric

QUESTION = [{"role": "user", "content": "where does this request run"}]


def test_chat_carries_point_headers_and_real_usage(fabric: Fabric) -> None:
    raw = fabric.client("demo-global").chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION, max_tokens=50
    )
    chat = raw.parse()
    assert chat.choices[0].message.content == "where does this request run"
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 5
    assert chat.usage.prompt_tokens == 6
    assert raw.headers["x-grifo-point"] == "lima-edge"
    assert raw.headers["x-grifo-jurisdiction"] == "PE"
    assert raw.headers["x-request-id"].startswith("req-")
    assert int(raw.headers["x-grifo-cost-micros"]) >= 1
    assert float(raw.headers["x-grifo-overhead-ms"]) > 0


def test_eu_tenant_only_reaches_eu_points(fabric: Fabric) -> None:
    client = fabric.client("demo-eu")
    for _ in range(5):
        raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=QUESTION)
        assert raw.headers["x-grifo-point"] == "frankfurt-regional"
        assert raw.headers["x-grifo-jurisdiction"] == "DE"


def test_latam_tenant_is_served_in_peru(fabric: Fabric) -> None:
    raw = fabric.client("demo-latam").completions.with_raw_response.create(
        model=CHAT, prompt="hola desde lima", max_tokens=8
    )
    assert raw.headers["x-grifo-jurisdiction"] == "PE"
    completion = raw.parse()
    assert completion.choices[0].text == "hola desde lima"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3


def test_stream_headers_arrive_before_chunks_and_usage_is_metered(fabric: Fabric) -> None:
    client = fabric.client("demo-eu")
    with client.chat.completions.with_streaming_response.create(
        model=CHAT,
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-grifo-point"] == "frankfurt-regional"
        assert response.headers["x-grifo-jurisdiction"] == "DE"
        assert response.headers["content-type"].startswith("text/event-stream")
        head_cost = int(response.headers["x-grifo-cost-micros"])
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 4)
    final_cost = (usage.model_extra or {})["cost_micros"]
    assert final_cost >= head_cost
    entry = fabric.ledger(request_id)[request_id]
    assert (entry.prompt_tokens, entry.completion_tokens) == (5, 4)
    assert entry.cost_micros == final_cost
    assert (entry.point, entry.jurisdiction, entry.tenant) == (
        "frankfurt-regional",
        "DE",
        "demo-eu",
    )


def test_stream_without_include_usage_has_no_usage_chunk(fabric: Fabric) -> None:
    stream = fabric.client("demo-global").chat.completions.create(
        model=CHAT, messages=QUESTION, stream=True
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_embeddings_and_models(fabric: Fabric) -> None:
    client = fabric.client("demo-eu")
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=["a b", "c"])
    result = raw.parse()
    assert [len(d.embedding) for d in result.data] == [8, 8]
    assert result.usage.prompt_tokens == 3
    assert raw.headers["x-grifo-jurisdiction"] == "DE"
    assert sorted(m.id for m in client.models.list()) == [CHAT, EMBED]


def test_ledger_has_one_entry_per_request_matching_headers(fabric: Fabric) -> None:
    client = fabric.client("demo-latam")
    ids, tokens = {}, {}
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": f"ledger check {i}"}]
        )
        ids[raw.headers["x-request-id"]] = int(raw.headers["x-grifo-cost-micros"])
        usage = raw.parse().usage
        assert usage is not None
        tokens[raw.headers["x-request-id"]] = (usage.prompt_tokens, usage.completion_tokens)
    rows = fabric.ledger(*ids)
    assert {rid: rows[rid].cost_micros for rid in ids} == ids
    key = fabric.running.gateway.keys.authenticate(f"Bearer {fabric.keys['demo-latam']}".encode())
    for rid in ids:
        row = rows[rid]
        assert (row.prompt_tokens, row.completion_tokens) == tokens[rid]
        assert row._replace(prompt_tokens=0, completion_tokens=0, latency_ms=0, ts_ms=0) == (
            LedgerEntry(rid, 0, "demo-latam", key.key_id, "/v1/chat/completions", CHAT,
                        "lima-edge", "PE", 0, 0, ids[rid], "ok", "point", 0)
        )  # fmt: skip
        assert row.latency_ms > 0
        assert abs(row.ts_ms - time.time() * 1000) < 60_000


def test_client_can_narrow_but_never_widen(fabric: Fabric) -> None:
    global_client = fabric.client("demo-global")
    raw = global_client.chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION, extra_headers={"x-grifo-allowed-jurisdictions": "DE,FR"}
    )
    assert raw.headers["x-grifo-point"] == "frankfurt-regional"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        fabric.client("demo-eu").chat.completions.create(
            model=CHAT, messages=QUESTION, extra_headers={"x-grifo-allowed-jurisdictions": "US"}
        )
    assert denied.value.code == "jurisdiction_not_allowed"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"model": "fake-chat", "messages": [], "max_tokens": 5}', 400, "messages"),
        (
            b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": -1}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": 100000000}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], '
            b'"api_base": "http://169.254.169.254"}',
            400,
            "api_base",
        ),
        (
            b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    fabric: Fabric, body: bytes, status: int, param: str | None
) -> None:
    request = urllib.request.Request(
        f"{fabric.url}/v1/chat/completions",
        data=body,
        headers={"authorization": f"Bearer {fabric.keys['demo-global']}"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=10)
    assert failure.value.code == status
    with failure.value:
        error = json.loads(failure.value.read())["error"]
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    assert failure.value.headers["x-request-id"].startswith("req-")


def test_missing_and_invalid_keys_are_401(fabric: Fabric) -> None:
    bad = openai.OpenAI(base_url=f"{fabric.url}/v1", api_key="grf-00000000-nope", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as failure:
        bad.chat.completions.create(model=CHAT, messages=QUESTION)
    assert failure.value.code == "invalid_api_key"
    assert "grf-00000000-nope" not in str(failure.value.body)


def test_readyz_healthz_and_metrics(fabric: Fabric) -> None:
    with urllib.request.urlopen(f"{fabric.url}/readyz", timeout=5) as resp:
        ready = json.loads(resp.read())
    assert ready["ready"] is True
    assert set(ready["points"]) == {"lima-edge", "frankfurt-regional", "virginia-central"}
    with urllib.request.urlopen(f"{fabric.url}/healthz", timeout=5) as resp:
        assert resp.status == 200
    fabric.client("demo-global").chat.completions.create(model=CHAT, messages=QUESTION)
    with urllib.request.urlopen(f"{fabric.url}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert (
        'grifo_requests_total{endpoint="/v1/chat/completions",point="lima-edge",status="200"}'
        in metrics
    )
    assert "grifo_cost_micros_total" in metrics
    assert "gen_ai_server_time_to_first_token_seconds" in metrics
    model = f'gen_ai_operation_name="chat",gen_ai_request_model="{CHAT}",point="lima-edge"'
    assert f"gen_ai_server_request_duration_seconds_count{{{model}}} " in metrics
    assert f"gen_ai_server_time_per_output_token_seconds_count{{{model}}} " in metrics
    usage = f'gen_ai_operation_name="chat",gen_ai_request_model="{CHAT}",gen_ai_token_type="output"'
    assert f"gen_ai_client_token_usage_count{{{usage}}} " in metrics
    assert 'grifo_point_up{point="virginia-central"} 1.0' in metrics
    assert "grifo_gateway_overhead_seconds_count" in metrics


def test_no_compliant_point_is_503_and_nothing_goes_elsewhere(fresh_fabric: Fabric) -> None:
    fab = fresh_fabric
    fab.stop_point("frankfurt-regional")
    others = {name: fab.completed(name) for name in ("lima-edge", "virginia-central")}
    client = fab.client("demo-eu")
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as failure:
            client.chat.completions.create(model=CHAT, messages=QUESTION)
        assert failure.value.status_code == 503
        assert failure.value.code == "no_compliant_point"
    with pytest.raises(openai.APIStatusError):
        client.embeddings.create(model=EMBED, input="x")
    assert {name: fab.completed(name) for name in others} == others
    with pytest.raises(urllib.error.HTTPError) as not_ready:
        urllib.request.urlopen(f"{fab.url}/readyz", timeout=5)
    assert not_ready.value.code == 503
    not_ready.value.close()


def test_refused_connection_fails_over_inside_the_allowed_set(fresh_fabric: Fabric) -> None:
    fab = fresh_fabric
    fab.stop_point("lima-edge")
    raw = fab.client("demo-global").chat.completions.with_raw_response.create(
        model=CHAT, messages=QUESTION
    )
    assert raw.headers["x-grifo-point"] in {"frankfurt-regional", "virginia-central"}
    with pytest.raises(openai.APIStatusError) as failure:
        fab.client("demo-latam").chat.completions.create(model=CHAT, messages=QUESTION)
    assert failure.value.status_code == 503


def test_tier_header_picks_the_tier_and_the_price_shows(fabric: Fabric) -> None:
    client = fabric.client("demo-global")
    costs = {}
    for tier, point in (("edge", "lima-edge"), ("central", "virginia-central")):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=QUESTION, max_tokens=5, extra_headers={"x-grifo-tier": tier}
        )
        assert raw.headers["x-grifo-point"] == point
        rid = raw.headers["x-request-id"]
        costs[tier] = fabric.ledger(rid)[rid].cost_micros
    assert costs["central"] > costs["edge"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=CHAT, messages=QUESTION, extra_headers={"x-grifo-tier": "orbital"}
        )
    assert bad.value.body["param"] == "x-grifo-tier"  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as none:
        fabric.client("demo-eu").chat.completions.create(
            model=CHAT, messages=QUESTION, extra_headers={"x-grifo-tier": "edge"}
        )
    assert none.value.status_code == 503


def test_usage_command_totals_the_ledger(fabric: Fabric) -> None:
    import subprocess
    import sys

    client = fabric.client("demo-latam")
    ids = [
        client.chat.completions.with_raw_response.create(model=CHAT, messages=QUESTION).headers[
            "x-request-id"
        ]
        for _ in range(3)
    ]
    fabric.ledger(*ids)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grifo",
            "usage",
            "--state-dir",
            str(fabric.state_dir),
            "--by",
            "tenant",
            "--period",
            "all",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    totals = {row["tenant"]: row for row in map(json.loads, out.splitlines())}
    rows = [e for e in fabric.running.db.ledger() if e.tenant == "demo-latam"]
    assert totals["demo-latam"]["requests"] == len(rows) >= 3
    assert totals["demo-latam"]["cost_micros"] == sum(e.cost_micros for e in rows)
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "grifo",
            "usage",
            "--state-dir",
            str(fabric.state_dir),
            "--by",
            "point",
            "--period",
            "all",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lima-edge" in table
