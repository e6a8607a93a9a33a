"""The registry as this gateway process sees it: registered points in and out of placement.

Every gateway process (workers and replicas) reads the registry every `heartbeat_s` and makes
its points match it: a new registration becomes a `PointState` (with its pool, its admission
limit and an immediate health check: it gets traffic once the gateway's own probe of `/health`
confirms its name and jurisdiction), a changed one is replaced, and one that was deregistered,
stopped heartbeating for `expire_after_s` or is no longer allowed by its token leaves placement
at once; its pool is closed once the requests it holds have ended. A row is trusted no further
than this process's own join tokens allow, whichever gateway wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from grifo.config.load import point_problems
from grifo.config.model import GrifoConfig, PointConfig
from grifo.config.registry import RegistryConfig
from grifo.dispatch.health import check_point
from grifo.dispatch.pools import PointPools
from grifo.errors import StoreUnavailableError
from grifo.http.client import ConnectionPool
from grifo.jurisdictions import merge_blocs
from grifo.registry.tokens import JoinTokens
from grifo.security.egress import egress_refusal
from grifo.store.registry_sql import RegisteredRow, RegistryTables
from grifo.store.select import StateStore
from grifo.topology import PointState, build_point_state

if TYPE_CHECKING:
    from grifo.service import Gateway

log = logging.getLogger("grifo.registry")

# Hosts a registered point's URL may resolve to: the networks points live on. Link-local,
# cloud metadata, unspecified, multicast and reserved addresses are refused (egress.py's table).
ALLOWED_ADDRESSES = frozenset({None, "loopback", "private", "private (ULA)", "shared (CGNAT)"})


class Signals(msgspec.Struct, frozen=True):
    """A heartbeat's load signals, as a point's `/load` reports them."""

    in_flight: int = 0
    queued: int = 0
    tokens_per_s: float = 0.0
    cache_usage: float = 0.0
    models: list[str] = []


@dataclass(slots=True)
class _Joined:
    state: PointState
    key: tuple[str, str]  # (identity, address): a change is a new point
    token_id: str
    since: float  # monotonic, when this process added it


class Roster:
    def __init__(
        self,
        gateway: Gateway,
        pools: PointPools,
        tables: RegistryTables,
        tokens: JoinTokens,
        settings: RegistryConfig,
    ) -> None:
        self.gateway = gateway
        self.pools = pools
        self.tables = tables
        self.tokens = tokens
        self.settings = settings
        self.static = frozenset(p.name for p in gateway.points)
        self.joined: dict[str, _Joined] = {}
        self.events: Counter[str] = Counter()
        self._left: dict[str, float] = {}  # name -> monotonic time this process removed it
        self._retired: list[tuple[PointState, ConnectionPool | None]] = []
        self._checks: set[asyncio.Task[None]] = set()
        self._refused: set[tuple[str, str]] = set()  # rows already logged as not lawful

    @property
    def expire_ms(self) -> int:
        return int(self.settings.expire_after_s * 1000)

    # -- the loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Read the registry every heartbeat_s and apply it (forever; cancel to stop)."""
        down = False
        next_sweep = 0.0
        while True:
            taken = time.monotonic()
            try:
                rows = await asyncio.to_thread(self.tables.rows)
                if taken >= next_sweep:  # rows long expired: any process may delete them
                    await asyncio.to_thread(self.tables.sweep, 2 * self.expire_ms)
                    next_sweep = taken + self.settings.expire_after_s
            except StoreUnavailableError:
                if not down:
                    log.warning("cannot read the point registry; keeping the points as they are")
                down = True
            else:
                down = False
                self.apply(rows, taken)
            await asyncio.sleep(self.settings.heartbeat_s)

    def apply(self, rows: list[RegisteredRow], taken: float) -> None:
        """Make this process's registered points those of `rows`, read at monotonic `taken`."""
        live: set[str] = set()
        expired: dict[str, int] = {}
        for row in rows:
            if row.age_ms > self.expire_ms:
                expired[row.name] = row.age_ms
            elif self._left.get(row.name, -1.0) < taken and self.upsert(row) is not None:
                live.add(row.name)  # (a point that left here after the read stays out)
        for name, joined in list(self.joined.items()):
            if name in live or joined.since > taken:  # added here after the read began
                continue
            if name in expired:
                age_s = expired[name] / 1000
                self.remove(name, f"no heartbeat for {age_s:.1f} s", "expired")
            else:
                self.remove(name, "deregistered", "deregistered")
        self._reap(taken)

    # -- one point ----------------------------------------------------------------------------
    def upsert(self, row: RegisteredRow) -> PointState | None:
        """Add a registration, replace it when its identity changed, or note its heartbeat;
        None when this process's tokens do not allow it (it then gets no traffic here)."""
        joined = self.joined.get(row.name)
        if joined is not None and joined.key == (row.identity, row.address):
            if row.heartbeat_ms != joined.state.heartbeat_ms:
                _heartbeat(joined.state, row)
            return joined.state
        config = self._lawful(row)
        if config is None:
            if joined is not None:
                self.remove(row.name, "no longer allowed by its join token", "refused")
            return None
        if joined is not None:
            self.remove(row.name, "registered again as another point", "replaced")
        state = build_point_state(config, config.url or "")
        state.source = "registered"
        state.mark_down("registered; waiting for its first health check")
        _heartbeat(state, row)
        if self.gateway.admission is not None:
            self.gateway.admission.add_point(state)
        self.pools.add(state, connect_host=row.address)
        self.gateway.points.append(state)
        self.gateway.placement.set_points(self.gateway.points)
        self.joined[row.name] = _Joined(
            state, (row.identity, row.address), row.token_id, time.monotonic()
        )
        self._left.pop(row.name, None)
        loop = asyncio.get_running_loop()
        check = loop.create_task(check_point(self.pools, state), context=contextvars.Context())
        self._checks.add(check)  # traffic once its first probe says who it is
        check.add_done_callback(self._checks.discard)
        self.events["joined"] += 1
        log.info(
            "point %s joined: %s %s at %s (join token %s)",
            row.name,
            config.jurisdiction,
            config.tier,
            config.url,
            row.token_id,
        )
        return state

    def remove(self, name: str, why: str, event: str) -> None:
        """Out of placement now; its pool closes once its requests have ended."""
        joined = self.joined.pop(name, None)
        self._left[name] = time.monotonic()
        if joined is None:
            return
        state = joined.state
        state.mark_down(why)
        self.gateway.points.remove(state)
        self.gateway.placement.set_points(self.gateway.points)
        self._retired.append((state, self.pools.remove(name)))
        with contextlib.suppress(KeyError):
            self.gateway.metrics.point_up.remove(name)
        self.events[event] += 1
        log.info("point %s left: %s", name, why)

    def _lawful(self, row: RegisteredRow) -> PointConfig | None:
        """The row's point, if this process's tokens allow it (rows may come from any replica,
        configured differently); logs each refusal once."""
        why = None
        try:
            config = msgspec.json.decode(row.identity, type=PointConfig)
        except (msgspec.DecodeError, msgspec.ValidationError):
            config, why = None, "its stored identity does not decode"
        token = self.tokens.get(row.token_id)
        if config is not None:
            refusal = None if token is None else token.refusal(config)
            if token is None:
                why = f"its join token {row.token_id} is not configured here"
            elif refusal is not None:
                why = refusal[1]
            elif config.name != row.name:
                why = "its stored identity names another point"
            elif config.name in self.static:
                why = "its name belongs to a configured point"
            elif point_problems("$", config):
                why = "its identity is invalid"
            elif egress_refusal(row.address) not in ALLOWED_ADDRESSES:
                why = "its address may not be reached"
        if why is None:
            return config
        if (row.name, row.identity) not in self._refused:
            self._refused.add((row.name, row.identity))
            log.warning("registered point %s gets no traffic here: %s", row.name, why)
        return None

    def _reap(self, now: float) -> None:
        """Close the pools of points that left once nothing runs there; forget old names."""
        keep = []
        admission = self.gateway.admission
        for state, pool in self._retired:
            if state.gateway_in_flight > 0 or state.closing_streams > 0:
                keep.append((state, pool))
                continue
            if pool is not None:
                asyncio.get_running_loop().create_task(pool.close())
            held = admission is not None and state.name not in self.joined
            if held and admission is not None and not admission.forget(state.name):
                keep.append((state, None))  # a slot still held there: forget it next time
        self._retired = keep
        horizon = now - 10 * self.settings.expire_after_s
        self._left = {n: t for n, t in self._left.items() if t >= horizon}
        if len(self._refused) > 10_000:
            self._refused.clear()

    async def close(self) -> None:
        for check in list(self._checks):
            check.cancel()
        await asyncio.to_thread(self.tables.close)


def _heartbeat(state: PointState, row: RegisteredRow) -> None:
    """Take a new heartbeat's signals (the health poller's own `/load` reads refresh them too;
    the models placement uses are only ever those the gateway's probe of `/health` saw)."""
    state.heartbeat_ms = row.heartbeat_ms
    try:
        signals = msgspec.json.decode(row.signals, type=Signals)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    state.reported(signals.queued, signals.in_flight)
    state.tokens_per_s = signals.tokens_per_s
    state.cache_usage = min(max(signals.cache_usage, 0.0), 1.0)


def build_roster(
    gateway: Gateway, pools: PointPools, db: StateStore, config: GrifoConfig
) -> Roster:
    """The roster of a gateway whose config has a `gateway.registry`."""
    settings = config.gateway.registry
    assert settings is not None
    tokens = JoinTokens.from_config(settings, merge_blocs(config.blocs))
    roster = Roster(gateway, pools, db.open_registry(), tokens, settings)
    gateway.metrics.registry.register(RosterCollector(roster))
    return roster


class RosterCollector(Collector):
    """`grifo_registry_events_total{event}` and each registered point's heartbeat age."""

    def __init__(self, roster: Roster) -> None:
        self._roster = roster

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "grifo_registry_events",
            "Registered points that joined, left or were refused, as this process saw them",
            labels=["event"],
        )
        for event, n in sorted(self._roster.events.items()):
            events.add_metric([event], n)
        age = GaugeMetricFamily(
            "grifo_point_heartbeat_age_seconds",
            "Seconds since a registered point's last heartbeat",
            labels=["point"],
        )
        now_ms = time.time() * 1000
        for name, joined in sorted(self._roster.joined.items()):
            if joined.state.heartbeat_ms is not None:
                age.add_metric([name], max(0.0, (now_ms - joined.state.heartbeat_ms) / 1000))
        yield from (events, age)
