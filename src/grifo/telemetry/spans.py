"""What each stage writes on its span (see tracing.py); only called when tracing is on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grifo.http.message import Response, StreamResponse
from grifo.placement.scoring import Candidate


def name_model(span: Any, model: str, tenant: str) -> None:
    """Once the body is decoded: the span takes the GenAI name `<operation> <model>`."""
    operation = span.attributes.get("gen_ai.operation.name", "chat") if span.attributes else "chat"
    span.update_name(f"{operation} {model}")
    span.set_attribute("gen_ai.request.model", model)
    span.set_attribute("grifo.tenant", tenant)


def placed(
    span: Any,
    allowed: frozenset[str] | None,
    data_class: str,
    tier: str | None,
    candidates: Sequence[Candidate],
) -> None:
    """The placement span: the allowed set it ranked within, and the candidates' scores."""
    span.set_attribute("grifo.allowed", sorted(allowed) if allowed is not None else ["*"])
    span.set_attribute("grifo.data_class", data_class)
    span.set_attribute("grifo.tier", tier or "any")
    span.set_attribute(
        "grifo.placement.candidates", [f"{c.point.name}:{c.score_ms:.2f}" for c in candidates]
    )
    span.end()


def metered(span: Any, point: str, jurisdiction: str, usage: tuple[int, int], cost: int) -> None:
    span.set_attribute("grifo.point", point)
    span.set_attribute("grifo.jurisdiction", jurisdiction)
    span.set_attribute("gen_ai.usage.input_tokens", usage[0])
    span.set_attribute("gen_ai.usage.output_tokens", usage[1])
    span.set_attribute("grifo.cost_micros", cost)


def end_with(span: Any, response: Response | StreamResponse) -> None:
    """End the request span with its response: now, or when a stream closes."""
    span.set_attribute("http.response.status_code", response.status)
    if isinstance(response, Response):
        span.end()
        return
    inner = response.on_close

    async def on_close(completed: bool) -> None:
        try:
            if inner is not None:
                await inner(completed)
        finally:
            span.set_attribute("grifo.stream_completed", completed)
            span.end()

    response.on_close = on_close
