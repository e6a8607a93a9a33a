"""The steps of an agent run, as they pass the gateway: one audit record each and a counter.

A run is metered once, as a whole (its last event carries its usage). Each step also leaves
an audit record of its own, with the run's request id, the status `step:<n>:<kind>` (kind
`model`, `tool:<name>` or `tool_error:<name>`), the step's tokens, no cost (the run's record has
it) and the HMAC of the step's event in place of the output: what a tool returned is provable
later without being stored.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from grifo.audit.log import AuditLog
from grifo.exchange import Exchange
from grifo.telemetry.metrics import GatewayMetrics
from grifo.topology import PointState

_KINDS = {"model.step": "model", "tool.result": "tool", "tool.error": "tool_error"}
_MARKERS = (b'"model.step"', b'"tool.result"', b'"tool.error"')


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Step(msgspec.Struct):
    type: str = ""
    step: int = 0
    tool: str = ""
    step_usage: _Usage | None = None


class _Run(msgspec.Struct):
    events: list[msgspec.Raw] = []


_step = msgspec.json.Decoder(_Step)
_run = msgspec.json.Decoder(_Run)


def is_step(payload: bytes) -> bool:
    return any(marker in payload for marker in _MARKERS)


def step_recorder(
    audit: AuditLog | None, metrics: GatewayMetrics, ex: Exchange, point: PointState
) -> Callable[[bytes], None]:
    """Records one step event (the JSON of a `data:` line) of `ex`'s run at `point`."""

    def record(payload: bytes) -> None:
        try:
            step = _step.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        kind = _KINDS.get(step.type)
        if kind is None:
            return
        metrics.agent_steps.labels(point.name, kind).inc()
        if audit is None:
            return
        usage = step.step_usage or _Usage()
        status = f"step:{step.step}:{kind}" + (f":{step.tool}" if kind != "model" else "")
        tokens = (usage.prompt_tokens, usage.completion_tokens)
        audit.append(ex, point, tokens, status, 0, output=payload)

    return record


def record_whole_run(payload: bytes, record: Callable[[bytes], None]) -> None:
    """The steps of a run answered as one JSON object (`stream: false`)."""
    try:
        run = _run.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    for event in run.events:
        if is_step(bytes(event)):
            record(bytes(event))
