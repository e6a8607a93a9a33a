"""Placement strategies to compare. `grifo` is the gateway's own ranking (`PlacementIndex`, with
the tenant's tier and `placement` settings); the others are baselines an operator might run
instead. Every strategy but `central-naive` keeps each request inside its allowed set, and
refuses it (as the gateway's 503 `no_compliant_point` would) when no point there serves it.
Only `grifo` honours a tenant's `tier` (a preference, not a law); the baselines are placement
policies of their own.

- grifo: the best-ranked candidate: rtt + queue (as last polled, or this gateway's in-flight
  count) + price, in ms.
- edge-first: the nearest compliant edge point, else regional, else central (ties: fewer
  in flight, then name). Blind to load.
- central-only: the compliant central point with the lowest rtt; refused when there is none.
- cheapest: the lowest expected cost of this request (its tokens at the point's prices, plus
  the point's hourly price over its service time alone); ties by rtt.
- round-robin: the compliant points in turn.
- central-naive: every request to the nearest central point, wherever the tenant may run (what
  one central region without grifo does); it counts jurisdiction violations.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from grifo.config.model import PlacementConfig
from grifo.errors import ModelNotFoundError, NoCompliantPointError
from grifo.metering.pricing import hardware_cost_micros, token_cost_micros
from grifo.placement.scoring import PlacementIndex
from grifo.planner.service import ServiceModel
from grifo.planner.tenants import Sender
from grifo.topology import PointState

NAMES = ("grifo", "edge-first", "central-only", "cheapest", "round-robin", "central-naive")
RESPECTS_POLICY = {name: name != "central-naive" for name in NAMES}
_TIER_ORDER = {"edge": 0, "regional": 1, "central": 2}


class Strategy:
    name = ""

    def __init__(
        self,
        points: Sequence[PointState],
        placement: PlacementConfig,
        models: dict[str, ServiceModel],
    ) -> None:
        self.points = sorted(points, key=lambda p: p.name)
        self.placement = placement
        self.models = models

    def choose(self, model: str, sender: Sender, prompt: int, completion: int) -> PointState | None:
        """The point for one request, or None to refuse it."""
        raise NotImplementedError

    def compliant(self, model: str, allowed: frozenset[str] | None) -> list[PointState]:
        return [
            p
            for p in self.points
            if p.healthy and model in p.models and (allowed is None or p.jurisdiction in allowed)
        ]


class Grifo(Strategy):
    name = "grifo"

    def __init__(
        self,
        points: Sequence[PointState],
        placement: PlacementConfig,
        models: dict[str, ServiceModel],
    ) -> None:
        super().__init__(points, placement, models)
        self.index = PlacementIndex(points, placement)

    def choose(self, model: str, sender: Sender, prompt: int, completion: int) -> PointState | None:
        try:
            ranked = self.index.rank(
                model, sender.allowed, completion, self.placement.max_attempts, sender.tier
            )
        except (NoCompliantPointError, ModelNotFoundError):
            return None
        return ranked[0].point


class EdgeFirst(Strategy):
    name = "edge-first"

    def choose(self, model: str, sender: Sender, prompt: int, completion: int) -> PointState | None:
        options = self.compliant(model, sender.allowed)
        return min(
            options,
            key=lambda p: (
                _TIER_ORDER[p.config.tier],
                p.config.rtt_ms,
                p.gateway_in_flight,
                p.name,
            ),
            default=None,
        )


class CentralOnly(Strategy):
    name = "central-only"

    def choose(self, model: str, sender: Sender, prompt: int, completion: int) -> PointState | None:
        options = [p for p in self.compliant(model, sender.allowed) if p.config.tier == "central"]
        return min(options, key=lambda p: (p.config.rtt_ms, p.name), default=None)


class CentralNaive(Strategy):
    name = "central-naive"

    def choose(self, model: str, sender: Sender, prompt: int, completion: int) -> PointState | None:
        options = [p for p in self.compliant(model, None) if p.config.tier == "central"]
        return min(options, key=lambda p: (p.config.rtt_ms, p.name), default=None)


class Cheapest(Strategy):
    name = "cheapest"

    def choose(self, model: str, sender: Sender, prompt: int, completion: int) -> PointState | None:
        def cost(p: PointState) -> tuple[int, float, str]:
            busy_ns = int(self.models[p.name].work_s(prompt, completion) * 1e9)
            micros = token_cost_micros(p.price(model), prompt, completion)
            micros += hardware_cost_micros(p.usd_per_hour_micros, busy_ns)
            return micros, p.config.rtt_ms, p.name

        return min(self.compliant(model, sender.allowed), key=cost, default=None)


class RoundRobin(Strategy):
    name = "round-robin"

    def __init__(
        self,
        points: Sequence[PointState],
        placement: PlacementConfig,
        models: dict[str, ServiceModel],
    ) -> None:
        super().__init__(points, placement, models)
        self._turn = itertools.count()

    def choose(self, model: str, sender: Sender, prompt: int, completion: int) -> PointState | None:
        options = self.compliant(model, sender.allowed)
        return options[next(self._turn) % len(options)] if options else None


_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Grifo, EdgeFirst, CentralOnly, Cheapest, RoundRobin, CentralNaive)
}


def build(
    name: str,
    points: Sequence[PointState],
    placement: PlacementConfig,
    models: dict[str, ServiceModel],
) -> Strategy:
    return _CLASSES[name](points, placement, models)


def parse_names(text: str) -> list[str]:
    """`grifo,edge-first` or `all`; unknown names are a ValueError naming the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"] or not names:
        return list(NAMES)
    unknown = [n for n in names if n not in _CLASSES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; known: {', '.join(NAMES)}, all")
    return list(dict.fromkeys(names))
