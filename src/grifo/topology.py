"""The gateway's registry of points: configuration plus live state, read by placement and dispatch.

Placement reads it, the health poller and dispatch write it; it does no I/O itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grifo.config.load import parse_point_url, usd_to_micros
from grifo.config.model import EjectionConfig, ModelPrice, PointConfig
from grifo.dispatch.latency import LatencyWindow
from grifo.metering.sharing import BusyClock

_epoch = [0]


def models_epoch() -> int:
    """Changes whenever any point's model list changes (a cheap staleness check for indexes)."""
    return _epoch[0]


def _bump_epoch() -> None:
    _epoch[0] += 1


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-USD per million tokens, so configured prices stay exact integers."""

    input_micros_per_1m: int
    output_micros_per_1m: int
    cached_input_micros_per_1m: int | None = None  # None: the input price


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    kind: str  # "chat" or "embeddings"
    context_length: int


@dataclass(slots=True)
class PointState:
    config: PointConfig
    host: str
    port: int
    prices: dict[str, Price]
    default_price: Price
    usd_per_hour_micros: int
    healthy: bool = False
    reason: str = "not yet checked"
    models: dict[str, ModelCard] = field(default_factory=dict)
    point_queued: int = 0  # as the point last reported (see `queued`)
    point_in_flight: int = 0
    tokens_per_s: float = 0.0
    cache_usage: float = 0.0  # the engine's KV cache in use, 0..1, when it says
    gateway_in_flight: int = 0
    finished_since_poll: int = 0  # requests of this process that ended here since the last /load
    closing_streams: int = 0  # past their `[DONE]` (out of `gateway_in_flight`), not yet closed
    answered: int = 0  # requests metered here by this gateway process
    busy: BusyClock = field(default_factory=BusyClock)
    failures: int = 0  # consecutive failed answers
    ejections: int = 0
    ejected_until: float = 0.0  # monotonic seconds
    probation: bool = False  # back from an ejection: one failure sends it out again
    public_key: str | None = None  # the key the point signs receipts with (from /health)
    tools: dict[str, str] | None = None  # agent-run tools: their jurisdiction (None: no runs)
    tls: bool = False  # reached at https://
    source: str = "static"  # or "registered": it joined through the registry (registry/)
    heartbeat_ms: int | None = None  # a registered point's last heartbeat (the store's clock)
    answer_s: LatencyWindow = field(default_factory=LatencyWindow)  # whole answers
    first_token_s: LatencyWindow = field(default_factory=LatencyWindow)  # streams
    # The config's, copied: read several times a request, where a property costs a call.
    name: str = field(init=False)
    jurisdiction: str = field(init=False)
    headers: tuple[tuple[bytes, bytes], ...] = field(init=False)  # x-grifo-point, -jurisdiction

    def __post_init__(self) -> None:
        self.name = self.config.name
        self.jurisdiction = self.config.jurisdiction
        self.headers = (
            (b"x-grifo-point", self.name.encode()),
            (b"x-grifo-jurisdiction", self.jurisdiction.encode()),
        )

    def price(self, model: str) -> Price:
        return self.prices.get(model, self.default_price)

    def set_models(self, models: dict[str, ModelCard]) -> None:
        """Record what the point serves; placement indexes are rebuilt when this changes."""
        if models != self.models:
            self.models = models
            _bump_epoch()

    @property
    def running(self) -> int:
        """Requests at the point by the freshest count: this process's own in flight, or the
        point's last report less the requests that ended here since (a report is up to a
        poll interval old, and a finished request would keep counting till the next)."""
        reported = self.point_in_flight - self.finished_since_poll  # not max(): usage._clamp
        return reported if reported > self.gateway_in_flight else self.gateway_in_flight

    @property
    def queued(self) -> int:
        """Requests waiting at the point by the freshest count: its last report less the
        requests that ended here since beyond those it was running then (those that waited
        have started and ended). A point whose sequential engine had not yet picked up a
        request when polled reported it queued; till the next poll it would keep counting,
        and a session would move off a point that is idle."""
        started_since = self.finished_since_poll - self.point_in_flight
        queued = self.point_queued - (started_since if started_since > 0 else 0)
        return queued if queued > 0 else 0  # not max(): see metering/usage.py's _clamp

    def reported(self, queued: int, in_flight: int) -> None:
        """The point's own count of its queue and running requests, just read."""
        self.point_queued, self.point_in_flight, self.finished_since_poll = queued, in_flight, 0

    def left(self) -> None:
        """A request this process sent here is over (answered, relayed to its end, or given
        up on)."""
        self.gateway_in_flight -= 1
        self.finished_since_poll += 1

    def mark_down(self, reason: str) -> None:
        self.healthy = False
        self.reason = reason

    def succeeded(self) -> None:
        self.failures = 0
        self.probation = False

    def failed(self, now_s: float, ejection: EjectionConfig) -> None:
        """A failed answer (5xx, broken or timed-out response); enough in a row eject the point."""
        self.failures += 1
        if self.probation:
            self.eject(now_s, ejection, "failed again on its first answers after an ejection")
        elif self.failures >= ejection.consecutive_failures:
            self.eject(now_s, ejection, f"{ejection.consecutive_failures} failures in a row")

    def eject(self, now_s: float, ejection: EjectionConfig, why: str) -> None:
        """Out of placement for base_s × times ejected (at most max_s), whatever probes say."""
        self.ejections += 1
        duration = min(ejection.base_s * self.ejections, ejection.max_s)
        self.ejected_until = now_s + duration
        self.failures = 0
        self.probation = False
        self.mark_down(f"ejected for {duration:g} s: {why}")

    def ejected(self, now_s: float) -> bool:
        return now_s < self.ejected_until


def build_point_state(config: PointConfig, url: str) -> PointState:
    parsed = parse_point_url(url)
    if parsed is None:
        raise ValueError(f"point {config.name}: bad url {url!r}")
    host, port = parsed

    def price(p: ModelPrice) -> Price:
        cached = p.cached_input_usd_per_1m
        return Price(
            usd_to_micros(p.input_usd_per_1m),
            usd_to_micros(p.output_usd_per_1m),
            None if cached is None else usd_to_micros(cached),
        )

    return PointState(
        config=config,
        host=host,
        port=port,
        prices={name: price(p) for name, p in config.prices.models.items()},
        default_price=price(config.prices.default),
        usd_per_hour_micros=usd_to_micros(config.prices.usd_per_hour),
        tls=url.startswith("https://"),
    )
