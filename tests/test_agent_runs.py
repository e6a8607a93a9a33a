"""Agent runs through the gateway (`POST /v1/grifo/agent-runs`): placed whole on one point,
streamed back as events, metered once and audited; session affinity and the cost cap."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from grifo.config.model import PlacementConfig, PointConfig
from grifo.errors import NoCompliantPointError
from grifo.placement.affinity import Affinity, session_key
from grifo.placement.runs import capped, tool_jurisdictions, with_tools
from grifo.placement.scoring import Candidate
from grifo.topology import build_point_state
from grifo.wire.requests import AgentLimits, AgentRunRequest
from tests.support.fabric import CHAT, Fabric

PATH = "/v1/grifo/agent-runs"


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def post(
    fabric: Fabric, tenant: str, body: dict[str, Any], path: str = PATH, **headers: str
) -> Reply:
    headers["authorization"] = f"Bearer {fabric.keys[tenant]}"
    headers["content-type"] = "application/json"
    data = json.dumps(body).encode()
    request = urllib.request.Request(fabric.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            got = response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        got = exc.code, dict(exc.headers.items()), exc.read()
    lower = {k.lower(): v for k, v in got[1].items()}
    return Reply(got[0], lower, got[2].decode())


def events_of(response: Reply) -> list[dict[str, Any]]:
    out = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: {"):
            out.append(json.loads(block[6:]))
    return out


def test_a_streamed_run_is_placed_in_its_jurisdiction_and_metered_once(fabric: Fabric) -> None:
    body = {"model": CHAT, "input": "hola desde lima", "tool_choice": "none"}
    response = post(fabric, "demo-latam", body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-grifo-point"] == "lima-edge"  # demo-latam: PE or BR only
    events = events_of(response)
    assert [e["type"] for e in events] == ["run.started", "model.step", "run.completed"]
    final = events[-1]
    assert final["status"] == "completed"
    assert final["output"] == "hola desde lima"
    assert "data: [DONE]\n\n: x-grifo-attestation " in response.text  # signed where it ran
    entry = fabric.ledger(response.headers["x-request-id"])[response.headers["x-request-id"]]
    assert entry.endpoint == PATH
    assert entry.point == "lima-edge"
    assert entry.status == "ok"
    assert entry.prompt_tokens == final["usage"]["prompt_tokens"] > 0
    assert entry.completion_tokens == final["usage"]["completion_tokens"] > 0
    assert final["usage"]["cost_micros"] == entry.cost_micros > 0
    assert "x-grifo-cost-micros" not in response.headers  # known at the end: in the usage


def test_a_whole_run_answers_one_json_object(fabric: Fabric) -> None:
    body = {"model": CHAT, "input": "one two", "tool_choice": "none", "stream": False}
    response = post(fabric, "demo-eu", body)
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["object"] == "agent.run"
    assert run["status"] == "completed"
    assert [e["type"] for e in run["events"]] == ["run.started", "model.step"]
    assert response.headers["x-grifo-jurisdiction"] == "DE"
    entry = fabric.ledger(response.headers["x-request-id"])[response.headers["x-request-id"]]
    assert entry.cost_micros == int(response.headers["x-grifo-cost-micros"]) > 0
    assert run["usage"]["cost_micros"] == entry.cost_micros
    assert entry.completion_tokens == run["usage"]["completion_tokens"]


def test_a_tool_no_allowed_point_offers_is_refused_before_dispatch(fabric: Fabric) -> None:
    body = {"model": CHAT, "input": "x", "tools": ["search_documents"]}
    response = post(fabric, "demo-global", body)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_compliant_point"
    assert "search_documents" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": CHAT}, "input"),
        ({"model": CHAT, "input": "x", "tools": ["../etc"]}, "tools"),
        ({"model": CHAT, "input": "x", "limits": {"max_steps": 0}}, "limits"),
        ({"model": CHAT, "input": "x", "tool_choice": "always"}, "tool_choice"),
        ({"model": CHAT, "input": "x", "session_id": "a b"}, "session_id"),
        ({"model": CHAT, "input": "x", "shell": True}, "shell"),
    ],
)
def test_bad_runs_get_400_naming_the_parameter(
    fabric: Fabric, body: dict[str, Any], param: str
) -> None:
    response = post(fabric, "demo-global", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_bad_session_header_is_400(fabric: Fabric) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    headers = {"x-grifo-session-id": "no spaces allowed"}
    response = post(fabric, "demo-global", body, "/v1/chat/completions", **headers)
    assert response.status_code == 400
    assert "session" in response.json()["error"]["message"]


# -- placement pieces, on point states without processes ---------------------------------------
def _point(name: str, tools: dict[str, str] | None, usd_in: float = 0.0) -> Any:
    config = PointConfig(
        name=name,
        site=name,
        region="r",
        jurisdiction="PE",
        tier="edge",
        prices={"default": {"input_usd_per_1m": usd_in, "output_usd_per_1m": usd_in / 2}},  # type: ignore[arg-type]
    )
    import msgspec

    config = msgspec.convert(msgspec.to_builtins(config), PointConfig)
    point = build_point_state(config, "http://127.0.0.1:1")
    point.tools = tools
    return point


def test_runs_go_only_where_every_tool_is_and_processes_in_the_allowed_set() -> None:
    a = Candidate(_point("a", {"search": "PE"}), 1.0)
    b = Candidate(_point("b", {"search": "PE", "weather": "PE"}), 2.0)
    c = Candidate(_point("c", None), 0.5)  # runs no agent runs (a proxy point)
    d = Candidate(_point("d", {"search": "PE", "weather": "US"}), 0.1)  # calls an API abroad
    assert with_tools([c, a, b], ["search"], None) == [a, b]
    assert with_tools([c, a, b], ["search", "weather"], None) == [b]
    assert with_tools([c, a, b], [], None) == [a, b]
    pe = frozenset({"PE"})
    assert with_tools([d, a, b], ["weather"], pe) == [b]
    assert with_tools([d, a, b], ["search"], pe) == [d, a, b]
    assert with_tools([d, b], ["weather"], frozenset({"PE", "US"})) == [d, b]
    with pytest.raises(NoCompliantPointError):
        with_tools([d], ["weather"], pe)
    assert tool_jurisdictions([d, b], ["weather"]) == {"US", "PE"}
    assert tool_jurisdictions([d, b], ["search"]) == {"PE"}


def test_the_cost_cap_lowers_the_token_budget_at_the_dearest_candidate() -> None:
    cheap = Candidate(_point("cheap", {}, usd_in=1.0), 1.0)
    dear = Candidate(_point("dear", {}, usd_in=4.0), 2.0)
    body = AgentRunRequest(model="m", input="x", limits=AgentLimits(max_cost_usd=0.001))
    # 0.001 USD at 4 USD per million tokens buys 250 tokens
    assert capped(body, [cheap, dear]).limits.max_tokens == 250
    assert capped(body, [cheap]).limits.max_tokens == 1000
    free = Candidate(_point("free", {}), 1.0)
    assert capped(body, [free]).limits.max_tokens == 16_384
    uncapped = AgentRunRequest(model="m", input="x")
    assert capped(uncapped, [dear]) is uncapped


def test_affinity_keeps_a_session_on_its_point_until_load_outweighs_it() -> None:
    now = [0.0]
    affinity = Affinity(PlacementConfig().affinity_slack_ms, ttl_s=60, clock=lambda: now[0])
    a, b = _point("a", {}), _point("b", {})
    key = session_key("t1", "s1", None)
    assert affinity.order(key, [Candidate(a, 10), Candidate(b, 20)])[0].point is a  # unknown
    affinity.remember(key, "b")
    ranked = affinity.order(key, [Candidate(a, 10), Candidate(b, 400)])
    assert [c.point.name for c in ranked] == ["b", "a"]
    assert affinity.kept == 1
    b.point_queued = 1  # b's engine is full: a waiting request would overwrite the session's cache
    ranked = affinity.order(key, [Candidate(a, 10), Candidate(b, 400)])
    assert [c.point.name for c in ranked] == ["a", "b"]
    b.point_queued = 0
    ranked = affinity.order(key, [Candidate(a, 10), Candidate(b, 900)])  # b is too loaded
    assert [c.point.name for c in ranked] == ["a", "b"]
    assert affinity.moved == 2
    assert affinity.order(key, [Candidate(a, 10)])[0].point is a  # b is not a candidate
    other_tenant = session_key("t2", "s1", None)
    assert affinity.order(other_tenant, [Candidate(a, 10), Candidate(b, 20)])[0].point is a
    now[0] = 61.0  # expired
    assert affinity.order(key, [Candidate(a, 10), Candidate(b, 20)])[0].point is a
    assert len(affinity) == 0


def test_affinity_forgets_the_oldest_sessions_past_its_capacity() -> None:
    affinity = Affinity(500, capacity=2)
    for s in ("s1", "s2", "s3"):
        affinity.remember(session_key("t", s, None), "p")
    assert len(affinity) == 2
    assert session_key("t", None, b"abc:1") == "t\x00abc:1"
    assert session_key("t", None, None) is None


def test_a_session_header_sticks_chats_to_the_point_that_served_it(fabric: Fabric) -> None:
    client = fabric.client("demo-global")

    def chat(**headers: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_headers=headers,
        )
        return str(raw.headers["x-grifo-point"])

    fabric.quiet()  # scores compare idle points: leftover work would move the session
    assert chat() == "lima-edge"  # the best point for this tenant
    assert chat(**{"x-grifo-tier": "regional", "x-grifo-session-id": "conv-42"}) == (
        "frankfurt-regional"
    )
    # Later turns name no tier: the session's point scores about 200 ms worse than Lima,
    # within the slack, so it stays; Virginia (its GPU hour weighs about 750 ms) would not.
    turns = {chat(**{"x-grifo-session-id": "conv-42"}) for _ in range(4)}
    assert turns == {"frankfurt-regional"}
    assert chat(**{"x-grifo-tier": "central", "x-grifo-session-id": "conv-44"}) == (
        "virginia-central"
    )
    assert chat(**{"x-grifo-session-id": "conv-44"}) == "lima-edge"
    assert chat(**{"x-grifo-session-id": "conv-43"}) == "lima-edge"


def test_prefix_keys_name_a_long_shared_opening() -> None:
    from grifo.placement.affinity import prefix_key
    from grifo.wire.requests import ChatCompletionRequest, CompletionRequest, Message

    system = "You are the plant's assistant. " * 40  # about 1,200 characters

    def chat(*texts: str, model: str = "m") -> ChatCompletionRequest:
        roles = ["system", "user", "assistant", "user"]
        messages = [Message(role=r, content=t) for r, t in zip(roles, texts, strict=False)]
        return ChatCompletionRequest(model=model, messages=messages)  # type: ignore[arg-type]

    turn1 = prefix_key("t", chat(system, "hello"), 1024)
    assert turn1 is not None
    assert prefix_key("t", chat(system, "hello", "hi!", "and now?"), 1024) == turn1
    # Another conversation under the same system prompt is another session: they spread.
    assert prefix_key("t", chat(system, "other user"), 1024) not in (turn1, None)
    long_user = prefix_key("t", chat(system[:800], "x" * 300), 1024)
    assert long_user is not None  # 800 + the first 256 characters of the user message
    assert prefix_key("t", chat(system[:800], "x" * 300 + "different tail"), 1024) == long_user
    assert prefix_key("t", chat(system[:700], "x" * 300), 1024) is None  # 956 < 1,024
    assert prefix_key("u", chat(system, "hello"), 1024) != turn1  # per tenant
    assert prefix_key("t", chat(system, "hello", model="n"), 1024) != turn1
    assert prefix_key("t", chat("short", "hello"), 1024) is None
    assert prefix_key("t", chat(system, "hello"), 0) is None  # off
    completion = CompletionRequest(model="m", prompt=system + "tail")
    assert prefix_key("t", completion, 1024) == prefix_key(
        "t", CompletionRequest(model="m", prompt=system + "tail"), 1024
    )
    run = AgentRunRequest(model="m", input="hello", instructions=system)
    assert prefix_key("t", run, 1024) == prefix_key("t", run, 1024) is not None


def test_chats_opening_with_one_long_prompt_follow_its_point(fabric: Fabric) -> None:
    client = fabric.client("demo-global")
    plant = "You answer questions about the Lima water plant. " * 30
    grid = "You answer questions about the Frankfurt power grid. " * 30

    def chat(system: str, *turns: str, **headers: str) -> str:
        roles = ["user", "assistant"] * 2
        messages = [{"role": "system", "content": system}]
        messages += [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=2,
            extra_headers=headers,
        )
        return str(raw.headers["x-grifo-point"])

    fabric.quiet()  # scores compare idle points: leftover work would move the conversation
    assert chat(plant, "level?", **{"x-grifo-tier": "regional"}) == "frankfurt-regional"
    # this conversation's later turns go where its prefix is cached; others to the best point
    assert chat(plant, "level?", "71 percent.", "and yesterday?") == "frankfurt-regional"
    assert chat(plant, "pressure?") == "lima-edge"
    assert chat(grid, "load?") == "lima-edge"


def test_a_runs_time_with_its_tools_does_not_teach_the_points_concurrency_limit(
    tmp_path: Path,
) -> None:
    """A point's limit learns from time per output token; an agent run's time includes its
    tool calls, so it must not count (a chat's does)."""
    import asyncio
    import time

    from grifo.admission.shedding import Admission
    from grifo.config.model import AdmissionConfig, GatewayConfig
    from grifo.exchange import Exchange
    from grifo.metering.answer import Answering
    from grifo.security.keys import Principal
    from grifo.store.ledger import LedgerWriter
    from grifo.store.sqlite import StateDB
    from grifo.telemetry.metrics import GatewayMetrics

    ledger = LedgerWriter(StateDB(tmp_path / "grifo.db").open_ledger, tmp_path / "spool")

    def learned(endpoint: str) -> float | None:
        point = _point("a", {})
        point.healthy = True
        admission = Admission(AdmissionConfig(initial_limit=8), [point])
        metrics = GatewayMetrics()
        answering = Answering(GatewayConfig(), ledger, metrics, None, None, None, admission)

        async def go() -> None:
            for _ in range(30):
                await admission.enter("t", 1, [Candidate(point, 1.0)], 1.0)
                ex = Exchange("r", endpoint, 0, Principal("t", "k", None), "m")
                ex.slot, ex.dispatched_ns = "a", time.monotonic_ns() - 2_000_000_000
                answering.free_slot(ex, ok=True, completion_tokens=10)

        asyncio.run(go())
        return admission.limits["a"].recent_s

    try:
        assert learned(PATH) is None  # 2 s for 10 tokens: tool time, not the point's speed
        assert learned("/v1/chat/completions") is not None
    finally:
        ledger.close()


def test_every_step_event_is_recorded_whatever_its_text_says() -> None:
    """A step whose tool is named `usage` (or whose text mentions it) is still a step, and
    only the run's last event is metered."""
    import asyncio

    from grifo.http.upstream import UpstreamResponse
    from grifo.metering.relay import StreamRelay
    from grifo.metering.usage import Usage

    events = [
        {"type": "model.step", "step": 1, "output": '{"tool": "usage"}',
         "step_usage": {"prompt_tokens": 5, "completion_tokens": 2},
         "run_usage": {"prompt_tokens": 5, "completion_tokens": 2}},
        {"type": "tool.call", "step": 1, "tool": "usage", "arguments": {}},
        {"type": "tool.result", "step": 1, "tool": "usage", "output": '"usage": 1',
         "sources": ["usage"]},
        {"type": "run.completed", "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]  # fmt: skip
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    body += b"data: [DONE]\n\ndata: [DONE]\n\n"  # a second one must not count again

    upstream = UpstreamResponse(None)  # type: ignore[arg-type]  # the body, no connection
    upstream._feed(body)
    upstream._finish()
    metered: list[Usage] = []
    steps: list[bytes] = []

    def meter(usage: Usage, status: str, source: str) -> int:
        metered.append(usage)
        return 7

    relay = StreamRelay(upstream, True, meter, lambda ok: None)
    relay.on_step = steps.append
    ends: list[bool] = []
    relay.on_end = lambda: ends.append(True)  # the point's in-flight count drops here

    async def drain() -> bytes:
        return b"".join([chunk async for chunk in relay.body()])

    out = asyncio.run(drain())
    assert [json.loads(s)["type"] for s in steps] == ["model.step", "tool.result"]
    assert metered == [Usage(5, 2)]
    assert b'"cost_micros":7' in out
    assert ends == [True]
    assert relay.ended


def test_a_slow_first_step_is_not_a_silent_point_and_runs_are_never_hedged(
    tmp_path: Any,
) -> None:
    """`try_timeout_s` and hedging judge a point by its time to first token; an agent run's
    first event comes after a whole model step, and its tools have effects: neither applies."""
    from tests.support.fabric import topology_yaml

    engine = "{kind: fake, embeddings: none, token_delay_ms: 40}"
    yaml = topology_yaml(engine).replace(
        "gateway: {demo_keys: true, health_interval_s: 0.2}",
        "gateway: {demo_keys: true, health_interval_s: 0.2,"
        " dispatch: {try_timeout_s: 0.2, hedge_tiers: [any, edge], hedge_initial_delay_ms: 1}}",
    )
    fab = Fabric.from_yaml(yaml, tmp_path)
    try:
        before = fab.completed("lima-edge"), fab.completed("frankfurt-regional")
        body = {"model": CHAT, "input": "one two three four five six seven eight nine ten",
                "tool_choice": "none"}  # fmt: skip
        response = post(fab, "demo-global", body)  # a step of ~20 tokens: ~0.8 s
        assert response.status_code == 200, response.text
        assert "x-grifo-tried" not in response.headers  # no attempt was given up on
        assert events_of(response)[-1]["status"] == "completed"
        after = fab.completed("lima-edge"), fab.completed("frankfurt-regional")
        assert sum(after) - sum(before) == 1  # it ran once, on one point
    finally:
        fab.close()


def test_usage_reads_cached_prompt_tokens() -> None:
    from grifo.metering.usage import Usage, run_usage_of, usage_of

    body = b'{"usage": {"prompt_tokens": 90, "completion_tokens": 5,'
    body += b' "prompt_tokens_details": {"cached_tokens": 64}}}'
    assert usage_of(body) == Usage(90, 5, 64)
    assert usage_of(b'{"usage": {"prompt_tokens": 9, "completion_tokens": 1}}') == Usage(9, 1)
    step = b'{"run_usage": {"prompt_tokens": 9, "completion_tokens": 1,'
    step += b' "prompt_tokens_details": {"cached_tokens": 3}}}'
    assert run_usage_of(step) == Usage(9, 1, 3)
