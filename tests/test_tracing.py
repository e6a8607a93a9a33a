"""OpenTelemetry traces: one trace per request, stage spans, context to the point and from the
client, checked with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from grifo.http.message import Request, Response, StreamResponse
from tests.support.fabric import CHAT, Fabric
from tests.support.threaded import ThreadedServer

EXPORTER = InMemorySpanExporter()
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class RecordingPoint:
    """A point that answers every chat request and keeps the `traceparent` each one carried."""

    def __init__(self) -> None:
        self.traceparents: list[str] = []
        self._server = ThreadedServer(self.handle)
        self.port = self._server.port

    async def handle(self, request: Request) -> Response | StreamResponse:
        ident = [(b"x-grifo-point", b"recorder"), (b"x-grifo-jurisdiction", b"PE")]
        if request.path == "/health":
            models = [{"id": CHAT, "kind": "chat", "context_length": 2048}]
            body = {"status": "ready", "name": "recorder", "jurisdiction": "PE", "models": models}
            return Response(200, msgspec.json.encode(body), ident)
        if request.path == "/load":
            return Response(200, b"{}", ident)
        self.traceparents.append(request.headers.get(b"traceparent", b"").decode())
        if msgspec.json.decode(request.body).get("stream"):
            return StreamResponse(200, _events(), ident)
        answer = {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": CHAT,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return Response(200, msgspec.json.encode(answer), ident)

    def close(self) -> None:
        self._server.close()


async def _events() -> AsyncIterator[bytes]:
    for delta in ({"role": "assistant", "content": ""}, {"content": "hi"}, {}):
        chunk = {"object": "chat.completion.chunk", "model": CHAT, "choices": [{"delta": delta}]}
        yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    yield b"data: " + msgspec.json.encode({"choices": [], "usage": usage}) + b"\n\n"
    yield b"data: [DONE]\n\n"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fabric, RecordingPoint]]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)  # grifo uses a provider it finds installed
    point = RecordingPoint()
    topology = f"""
gateway: {{demo_keys: true, health_interval_s: 0.2, tracing: {{enabled: true}}}}
points:
  - {{name: recorder, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 1,
     url: "http://127.0.0.1:{point.port}"}}
  - {{name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 30,
     engine: {{kind: fake, embeddings: fake}}}}
tenants:
  - {{name: demo-peru, allowed_jurisdictions: [PE]}}
"""
    fab = Fabric.from_yaml(topology, tmp_path_factory.mktemp("tracing"))
    yield fab, point
    fab.close()
    point.close()


def _post(fab: Fabric, body: dict[str, object], key: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", fab.running.port, timeout=10)
    headers = {
        "authorization": f"Bearer {key}",
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, response.getheader("x-request-id") or "", text


def _root(request_id: str) -> ReadableSpan:
    """The request's span once it has ended (a stream's ends just after its last byte)."""
    deadline = time.monotonic() + 5
    while True:
        for span in EXPORTER.get_finished_spans():
            if (span.attributes or {}).get("grifo.request_id") == request_id:
                return span
        assert time.monotonic() < deadline, f"no span for {request_id}"
        time.sleep(0.01)


def _trace_of(request_id: str) -> dict[str, ReadableSpan]:
    root = _root(request_id)
    spans = EXPORTER.get_finished_spans()
    assert root.context is not None
    same = [
        s for s in spans if s.context is not None and s.context.trace_id == root.context.trace_id
    ]
    return {s.name: s for s in same}


def test_a_request_is_one_trace_joined_to_the_client_and_carried_to_the_point(
    traced: tuple[Fabric, RecordingPoint],
) -> None:
    fab, point = traced
    body = {"model": CHAT, "messages": [{"role": "user", "content": "trace me"}]}
    status, request_id, _ = _post(fab, body, fab.keys["demo-peru"])
    assert status == 200
    spans = _trace_of(request_id)
    assert set(spans) == {f"chat {CHAT}", "placement", "admission", "dispatch", "attempt recorder"}
    root = spans[f"chat {CHAT}"]
    assert root.context is not None
    assert f"{root.context.trace_id:032x}" == CLIENT_TRACE  # joined the caller's trace
    assert root.parent is not None
    assert f"{root.parent.span_id:016x}" == CLIENT_SPAN
    attributes = root.attributes or {}
    assert attributes["gen_ai.request.model"] == CHAT
    assert attributes["gen_ai.usage.input_tokens"] == 3
    assert attributes["gen_ai.usage.output_tokens"] == 1
    assert attributes["grifo.point"] == "recorder"
    assert attributes["grifo.jurisdiction"] == "PE"
    assert attributes["http.response.status_code"] == 200
    placement = spans["placement"].attributes or {}
    assert str(next(iter(placement["grifo.placement.candidates"]))).startswith("recorder:")
    assert "PE" in list(placement["grifo.allowed"])
    for name in ("placement", "admission", "dispatch"):
        parent = spans[name].parent
        assert parent is not None
        assert parent.span_id == root.context.span_id
    attempt = spans["attempt recorder"]
    assert attempt.context is not None
    assert (attempt.attributes or {})["grifo.outcome"] == "ok"
    # The point got the attempt's context: its work is a child of this attempt.
    sent = point.traceparents[-1].split("-")
    assert sent[1] == CLIENT_TRACE
    assert sent[2] == f"{attempt.context.span_id:016x}"


def test_a_stream_span_ends_with_the_stream_and_a_refusal_is_an_error_span(
    traced: tuple[Fabric, RecordingPoint],
) -> None:
    fab, _ = traced
    body = {"model": CHAT, "messages": [{"role": "user", "content": "x"}], "stream": True}
    status, request_id, text = _post(fab, body, fab.keys["demo-peru"])
    assert status == 200
    assert "data: [DONE]" in text
    root = _trace_of(request_id)[f"chat {CHAT}"]
    attributes = root.attributes or {}
    assert attributes["grifo.stream_completed"] is True
    assert attributes["gen_ai.usage.output_tokens"] == 1
    status, request_id, _ = _post(fab, {**body, "stream": False}, "grf-00000000-not-a-key")
    assert status == 401
    refused = _root(request_id)
    assert not refused.status.is_ok
    assert (refused.attributes or {})["error.type"] == "invalid_api_key"


def test_the_point_traces_its_generation_under_the_gateways_attempt(
    traced: tuple[Fabric, RecordingPoint],
) -> None:
    """A point with tracing: the engine's span is a child of the `traceparent` it was sent,
    with the tokens and time to first token; its GenAI metrics count the same generation."""
    from grifo.point.app import PointApp, PointIdentity
    from grifo.point.engines.fake import FakeEmbedder, FakeGenerator
    from grifo.point.runner import EngineRunner
    from grifo.telemetry.tracing import Tracing

    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # the one `traced` installed
    identity = PointIdentity("lima-edge", "lima", "sa-west", "PE", "edge")
    runner = EngineRunner(FakeGenerator("fake-chat", 2048, 0.001), FakeEmbedder())
    app = PointApp(identity, runner, tracing=Tracing(provider.get_tracer("test")))
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "one two three"}]}

    async def call() -> Response | StreamResponse:
        request = Request(
            "POST",
            "/v1/chat/completions",
            "",
            {b"traceparent": parent.encode(), b"x-request-id": b"point-span"},
            json.dumps(body).encode(),
        )
        return await app.handle(request)

    try:
        response = asyncio.run(call())
    finally:
        runner.close()
    assert response.status == 200
    engine = [
        s
        for s in EXPORTER.get_finished_spans()
        if s.context is not None and f"{s.context.trace_id:032x}" == parent.split("-")[1]
    ]
    assert len(engine) == 1
    span = engine[0]
    assert span.name == "chat fake-chat"
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == parent.split("-")[2]
    attributes = span.attributes or {}
    assert attributes["grifo.point"] == "lima-edge"
    assert attributes["gen_ai.usage.output_tokens"] == 3
    assert float(str(attributes["grifo.time_to_first_token_ms"])) >= 0
    metrics = generate_latest(app.metrics.registry).decode()
    model = 'gen_ai_request_model="fake-chat"'
    assert f"gen_ai_server_request_duration_seconds_count{{{model}}} 1.0" in metrics
    assert f"gen_ai_server_time_per_output_token_seconds_count{{{model}}} 1.0" in metrics


def test_a_gateway_with_tracing_starts_its_points_tracing() -> None:
    from grifo.config.model import TracingConfig
    from grifo.telemetry.tracing import point_env

    assert point_env(TracingConfig()) is None  # off: the points' environment is left alone
    assert point_env(TracingConfig(enabled=True)) == {"GRIFO_TRACING": "1"}
    endpoint = "http://collector:4318/v1/traces"
    env = point_env(TracingConfig(enabled=True, otlp_endpoint=endpoint))
    assert env == {"GRIFO_TRACING": "1", "GRIFO_OTLP_ENDPOINT": endpoint}
