"""OpenTelemetry traces of requests, off by default (`gateway.tracing`).

One trace per request: a server span named as the GenAI conventions name it (`chat <model>`,
`embeddings <model>`), with children for admission (limits, budget, the concurrency queue),
placement (the allowed set, and the candidates with their scores) and dispatch, which has one
child per attempt (point, jurisdiction, outcome). Each attempt sends its own `traceparent` to the
point, and a client's `traceparent` is honoured, so the gateway's spans join the caller's trace.
The SDK is imported only when tracing is on: a gateway without it pays one `is None` per stage.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from grifo.config.model import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

# The request span of the request being handled (set in `Gateway.infer`).
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("grifo_span", default=None)

_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/grifo/agent-runs": "invoke_agent",
}


class _Getter:
    """Reads W3C trace context from a request's lower-case bytes headers."""

    def get(self, carrier: Mapping[bytes, bytes], key: str) -> list[str] | None:
        value = carrier.get(key.encode("latin-1"))
        return None if value is None else [value.decode("latin-1")]

    def keys(self, carrier: Mapping[bytes, bytes]) -> list[str]:
        return [k.decode("latin-1") for k in carrier]


class Tracing:
    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self._getter = _Getter()

    def request(self, path: str, model: str, headers: Mapping[bytes, bytes], rid: str) -> Span:
        """The request's server span, a child of the client's `traceparent` if it sent one."""
        from opentelemetry.trace import SpanKind

        context = self._propagator.extract(headers, getter=self._getter)  # type: ignore[arg-type]
        operation = _OPERATIONS.get(path, "chat")
        return self._tracer.start_span(
            f"{operation} {model}".strip(),
            context=context,
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                "grifo.request_id": rid,
                "url.path": path,
            },
        )

    def child(self, parent: Span, name: str, attributes: Mapping[str, Any] | None = None) -> Span:
        from opentelemetry import trace

        return self._tracer.start_span(
            name, context=trace.set_span_in_context(parent), attributes=attributes
        )

    def traceparent(self, span: Span) -> bytes:
        """The W3C `traceparent` that makes a point's work a child of `span`."""
        ctx = span.get_span_context()
        flags = int(ctx.trace_flags)
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags:02x}".encode()


def failed(span: Span, status: int, code: str) -> None:
    """Mark a span as failed with grifo's error code (HTTP status for client errors too)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    span.set_attribute("error.type", code)
    span.set_status(Status(StatusCode.ERROR, code))


def build(config: TracingConfig) -> Tracing | None:
    """The gateway's tracing, or None when off. A tracer provider already installed (a test's
    in-memory exporter, an application's own setup) is used as it is; otherwise one exporting
    OTLP over HTTP to `otlp_endpoint` is installed."""
    if not config.enabled:
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBasedTraceIdRatio(config.sample_ratio),
        )
        endpoint = config.otlp_endpoint
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
    return Tracing(provider.get_tracer("grifo"))


ENV = "GRIFO_TRACING"  # a point traces its generations when this is 1 (see README)
ENDPOINT_ENV = "GRIFO_OTLP_ENDPOINT"


def point_env(config: TracingConfig) -> dict[str, str] | None:
    """What the points a gateway starts need in their environment to trace as it does."""
    if not config.enabled:
        return None
    env = {ENV: "1"}
    if config.otlp_endpoint is not None:
        env[ENDPOINT_ENV] = config.otlp_endpoint
    return env


def for_point(name: str) -> Tracing | None:
    """A point's tracing, from its environment (GRIFO_TRACING=1, GRIFO_OTLP_ENDPOINT)."""
    if os.environ.get(ENV, "").lower() not in ("1", "true", "yes"):
        return None
    endpoint = os.environ.get(ENDPOINT_ENV)
    return build(
        TracingConfig(enabled=True, otlp_endpoint=endpoint, service_name=f"grifo-point/{name}")
    )
