"""Rank the compliant, healthy points that serve a model.

score (ms) = rtt_ms + queue_ms_per_request × (requests queued or running at the point, counting
this gateway's own in-flight ones) + cache_ms_at_full × the share of the point's engine KV cache
in use (when the engine reports it) + ms_per_micro_usd × expected cost in micro-USD, where the
expected cost is a nominal prompt plus the request's max tokens, and one second of the point's
hourly price. Lowest score first; ties go to the lower name so placement is deterministic.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from typing import NamedTuple

from grifo.config.model import PlacementConfig
from grifo.errors import ModelNotFoundError, NoCompliantPointError
from grifo.topology import PointState, models_epoch

# A nominal request used to compare prices when the real token counts are not known yet.
NOMINAL_PROMPT_TOKENS = 500


class Candidate(NamedTuple):  # immutable, and built in 220 ns where a frozen dataclass takes 500
    point: PointState
    score_ms: float


def rank(
    points: Sequence[PointState],
    model: str,
    allowed: frozenset[str] | None,
    completion_tokens: int,
    config: PlacementConfig,
) -> list[Candidate]:
    """Every candidate, best first (builds an index: for tests and one-off use)."""
    return PlacementIndex(points, config).rank(model, allowed, completion_tokens, None)


# (lower bound of the score, name, point, ms per completion token); sorted by the first two.
_Entry = tuple[float, str, PointState, float]


class PlacementIndex:
    """Points by model and country, each list sorted by the static part of their score.

    The dynamic parts (queue, expected completion cost) only add, so a scan in static order can
    stop as soon as the next static score exceeds the k-th best full score: ranking costs about
    k entries, not the number of points. Rebuilt when any point's models change.
    """

    def __init__(self, points: Sequence[PointState], config: PlacementConfig) -> None:
        self._points = list(points)
        self._config = config
        self._epoch = -1
        self._lists: dict[str, dict[str, list[_Entry]]] = {}

    def set_points(self, points: Sequence[PointState]) -> None:
        """Points joined or left (registry/roster.py): rank these from now on."""
        self._points = list(points)
        self._epoch = -1

    def _index(self) -> dict[str, dict[str, list[_Entry]]]:
        epoch = models_epoch()
        if epoch != self._epoch:
            self._epoch, self._lists = epoch, self._build()
        return self._lists

    def _build(self) -> dict[str, dict[str, list[_Entry]]]:
        w = self._config.ms_per_micro_usd
        lists: dict[str, dict[str, list[_Entry]]] = {}
        for point in self._points:
            for model in point.models:
                price = point.price(model)
                static = point.config.rtt_ms + w * (
                    NOMINAL_PROMPT_TOKENS * price.input_micros_per_1m / 1_000_000
                    + point.usd_per_hour_micros / 3600
                )
                out_w = w * price.output_micros_per_1m / 1_000_000
                by_country = lists.setdefault(model, {})
                by_country.setdefault(point.jurisdiction, []).append(
                    (static, point.name, point, out_w)
                )
        for by_country in lists.values():
            for entries in by_country.values():
                entries.sort(key=lambda e: (e[0], e[1]))
        return lists

    def rank(
        self,
        model: str,
        allowed: frozenset[str] | None,
        completion_tokens: int,
        k: int | None,
        tier: str | None = None,
    ) -> list[Candidate]:
        """The best `k` candidates (all if None) of `tier` (any if None), best first; never
        outside `allowed`.

        Raises ModelNotFoundError if no point has ever served `model`, and
        NoCompliantPointError if compliant points serve it but none is up.
        """
        by_country = self._index().get(model)
        if by_country is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
        if allowed is None:
            sources = list(by_country.values())
        else:
            sources = [by_country[c] for c in allowed if c in by_country]
        if not sources:
            raise NoCompliantPointError(
                f"no point in the allowed jurisdictions serves {model!r}; the request was "
                "not sent anywhere"
            )
        best = self._scan(sources, completion_tokens, k, tier)
        if not best:
            which = "point" if tier is None else f"{tier} point"
            raise NoCompliantPointError(
                f"no {which} in the allowed jurisdictions is available for {model!r}; the "
                "request was not sent anywhere else"
            )
        return [Candidate(point, score) for score, _, point in best]

    def _scan(
        self, sources: list[list[_Entry]], completion_tokens: int, k: int | None, tier: str | None
    ) -> list[tuple[float, str, PointState]]:
        queue_w = self._config.queue_ms_per_request
        cache_w = self._config.cache_ms_at_full
        entries = sources[0] if len(sources) == 1 else heapq.merge(*sources)
        best: list[tuple[float, str, PointState]] = []
        for static, name, point, out_w in entries:
            if k is not None and len(best) >= k and static > best[-1][0]:
                break
            if not point.healthy or (tier is not None and point.config.tier != tier):
                continue
            queue = point.queued + point.running
            load = queue_w * queue + cache_w * point.cache_usage
            bisect.insort(best, (static + out_w * completion_tokens + load, name, point))
            if k is not None and len(best) > k:
                best.pop()
        return best
