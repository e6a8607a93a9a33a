"""Rank the compliant, healthy points that serve a model.

score (ms) = rtt_ms + queue_ms_per_request × (requests queued or running at the point, counting
this gateway's own in-flight ones) + ms_per_micro_usd × expected cost in micro-USD.
Lowest score first; ties go to the lower name so placement is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grifo.config.model import PlacementConfig
from grifo.errors import ModelNotFoundError, NoCompliantPointError
from grifo.topology import PointState

# A nominal request used to compare prices when the real token counts are not known yet.
NOMINAL_PROMPT_TOKENS = 500


@dataclass(frozen=True, slots=True)
class Candidate:
    point: PointState
    score_ms: float


def rank(
    points: Sequence[PointState],
    model: str,
    allowed: frozenset[str] | None,
    completion_tokens: int,
    config: PlacementConfig,
) -> list[Candidate]:
    """Candidates best first. Points outside `allowed` are never returned, whatever their state.

    Raises ModelNotFoundError if no point the caller may use has ever served `model`, and
    NoCompliantPointError if some compliant point serves it but none is up.
    """
    compliant = [p for p in points if allowed is None or p.jurisdiction in allowed]
    serving = [p for p in compliant if model in p.models]
    if not serving:
        if any(model in p.models for p in points):
            raise NoCompliantPointError(
                f"no point in the allowed jurisdictions serves {model!r}; the request was "
                "not sent anywhere"
            )
        raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
    healthy = [p for p in serving if p.healthy]
    if not healthy:
        raise NoCompliantPointError(
            f"no point in the allowed jurisdictions is available for {model!r}; the request "
            "was not sent anywhere else"
        )
    ranked = [Candidate(p, _score(p, model, completion_tokens, config)) for p in healthy]
    ranked.sort(key=lambda c: (c.score_ms, c.point.name))
    return ranked


def _score(point: PointState, model: str, completion_tokens: int, config: PlacementConfig) -> float:
    queue = point.queued + max(point.point_in_flight, point.gateway_in_flight)
    price = point.price(model)
    cost_micros = (
        NOMINAL_PROMPT_TOKENS * price.input_micros_per_1m
        + completion_tokens * price.output_micros_per_1m
    ) / 1_000_000 + point.usd_per_hour_micros / 3600
    return (
        point.config.rtt_ms
        + config.queue_ms_per_request * queue
        + config.ms_per_micro_usd * cost_micros
    )
