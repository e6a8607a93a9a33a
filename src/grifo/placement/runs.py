"""Placing an agent run: only on points that offer every tool it asks for, and with its token
budget capped so the run's token price stays under its `max_cost_usd` at any candidate."""

from __future__ import annotations

import msgspec

from grifo.errors import NoCompliantPointError
from grifo.placement.scoring import Candidate
from grifo.wire import requests as wire


def with_tools(
    candidates: list[Candidate], tools: list[str], allowed: frozenset[str] | None
) -> list[Candidate]:
    """The candidates that run agent runs and offer all of `tools`, each processing in the
    `allowed` set (a tool calling an API abroad is processing abroad), in order."""
    fit = [c for c in candidates if _offers(c.point.tools, tools, allowed)]
    if not fit:
        which = ", ".join(sorted(set(tools))) or "no tools"
        raise NoCompliantPointError(
            f"no available point in the allowed jurisdictions runs agent runs with {which} "
            "processed in the allowed jurisdictions; the run was not sent anywhere"
        )
    return fit


def _offers(
    offered: dict[str, str] | None, tools: list[str], allowed: frozenset[str] | None
) -> bool:
    if offered is None:
        return False
    for tool in tools:
        where = offered.get(tool)
        if where is None or (allowed is not None and where not in allowed):
            return False
    return True


def tool_jurisdictions(candidates: list[Candidate], tools: list[str]) -> set[str]:
    """Where the run's tools process data, at any of the candidates."""
    return {c.point.tools[t] for c in candidates if c.point.tools is not None for t in tools}


def capped(body: wire.AgentRunRequest, candidates: list[Candidate]) -> wire.AgentRunRequest:
    """`body` with `limits.max_tokens` lowered to what `max_cost_usd` buys at the dearest
    token price among the candidates (hardware time is not part of this cap)."""
    limit_usd = body.limits.max_cost_usd
    if limit_usd is None:
        return body
    per_1m = max(
        max(p.input_micros_per_1m, p.output_micros_per_1m)
        for p in (c.point.price(body.model) for c in candidates)
    )
    if per_1m <= 0:
        return body
    affordable = int(limit_usd * 1_000_000 * 1_000_000) // per_1m
    if affordable >= body.limits.max_tokens:
        return body
    limits = msgspec.structs.replace(body.limits, max_tokens=max(affordable, 1))
    return msgspec.structs.replace(body, limits=limits)
