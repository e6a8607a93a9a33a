"""`grifo serve`'s wiring: a started gateway from a config, its local points with it.

The single wiring path: config → state directory (SQLite, keys) → points → Gateway → HTTP.
How the process then runs (workers, signals) is `lifecycle.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from grifo.admission import build
from grifo.admission.idempotency import Idempotency
from grifo.api.admin import AdminApi
from grifo.api.app import GatewayApp
from grifo.api.dashboard import dashboard_state
from grifo.audit.log import AuditLog
from grifo.audit.setup import open_audit_log, policy_digest
from grifo.config.model import GrifoConfig, TenantConfig
from grifo.dispatch.health import HealthPoller
from grifo.dispatch.outliers import eject_slow_points
from grifo.dispatch.pools import PointPools
from grifo.http.message import Request, Response
from grifo.http.server import HttpServer, ServerLimits
from grifo.jurisdictions import merge_blocs
from grifo.registry.api import RegistryApi
from grifo.registry.roster import Roster, build_roster
from grifo.security.keys import KeyRing
from grifo.security.provision import KEY_REFRESH_S, build_keyring, refresh_keys
from grifo.security.tenants import Directory
from grifo.security.tls import client_context, server_context
from grifo.service import Gateway
from grifo.store.ledger import LedgerWriter
from grifo.store.select import StateStore, open_state, redis_url
from grifo.store.spool import segments
from grifo.store.sqlite import StateDB
from grifo.supervisor import LocalPoint, start_points, stop_points
from grifo.telemetry import tracing
from grifo.telemetry.fabric import point_states
from grifo.telemetry.metrics import GatewayMetrics
from grifo.telemetry.peers import Peers
from grifo.telemetry.scrape import scrape
from grifo.topology import PointState, build_point_state

log = logging.getLogger("grifo.serve")


@dataclass(slots=True)
class Running:
    """A started gateway and what it owns; `stop()` releases all of it."""

    gateway: Gateway
    server: HttpServer
    poller: HealthPoller
    db: StateStore
    port: int
    local_points: list[LocalPoint] = field(default_factory=list)
    demo_keys: dict[str, str] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    internal: HttpServer | None = None  # workers only: serves this process's own /metrics
    roster: Roster | None = None  # points that joined, when `gateway.registry` is configured

    async def stop(self, grace_s: float = 10.0) -> None:
        for task in self.tasks:
            task.cancel()
        await self.server.close(grace_s)
        if self.internal is not None:
            assert self.gateway.peers is not None
            self.gateway.peers.unregister()
            await self.internal.close(0.5)
        await self.poller.stop()
        if self.roster is not None:
            await self.roster.close()
        await stop_points(self.local_points)
        await self.gateway.pools.close()
        if self.gateway.budgets is not None:
            await self.gateway.budgets.close()
        if self.gateway.limits is not None:
            await self.gateway.limits.close()
        self.gateway.ledger.close()
        if self.gateway.audit is not None:
            self.gateway.audit.close()
        self.db.close()


def _tenants_applier(config: GrifoConfig, gateway: Gateway) -> Callable[[list[TenantConfig]], None]:
    """What a change of the effective tenants (config and admin API) updates in this process."""

    def on_tenants(tenants: list[TenantConfig]) -> None:
        build.apply_tenants(tenants, gateway.budgets, gateway.limits, gateway.admission)
        if gateway.audit is not None:  # records name the policy they were decided under
            effective = msgspec.structs.replace(config, tenants=list(tenants))
            gateway.audit.policy = policy_digest(effective)

    return on_tenants


async def start(
    config: GrifoConfig,
    state_dir: Path,
    host: str,
    port: int,
    *,
    ready_timeout_s: float = 180.0,
    point_urls: Mapping[str, str] | None = None,
    reuse_port: bool = False,
    worker: int = 0,
) -> Running:
    """Start a gateway. With `point_urls` (a worker of `serve --workers`), local points are
    already running elsewhere and demo keys already exist."""
    state_dir.mkdir(parents=True, exist_ok=True)
    db = open_state(config.gateway.store, state_dir)
    directory = Directory(config, db)  # the config's tenants and those made over the admin API
    directory.update(db.stored_tenants())
    keys, demo = build_keyring(
        config, db, state_dir, create_demo=point_urls is None, tenants=directory.tenants()
    )
    db.prune_keys(int(time.time() * 1000) - 24 * 3600 * 1000)  # keys are kept for a day
    backlog: list[Path] = []
    if point_urls is None:  # the first process: no other gateway writes the spool yet
        if isinstance(db, StateDB) and redis_url(config.gateway.store) is None:
            db.reset_reservations()
        backlog = segments(state_dir / "spool")
        if backlog:
            log.warning("replaying %d ledger spool segments left by a previous run", len(backlog))
    audit = None
    if config.gateway.audit.enabled:
        audit = open_audit_log(config, state_dir, db, worker, first=point_urls is None)
    local: list[LocalPoint] = []
    if point_urls is None:
        local = await start_points(
            [p for p in config.points if p.engine is not None],
            state_dir / "logs",
            tracing.point_env(config.gateway.tracing),
        )
    urls = dict(point_urls or {}) | {lp.config.name: lp.url for lp in local}
    points: list[PointState] = [build_point_state(p, p.url or urls[p.name]) for p in config.points]
    tls_to_points = None
    if any(p.tls for p in points) or config.gateway.registry is not None:
        tls_to_points = client_context(config.gateway.point_tls)
    pools = PointPools(points, tls=tls_to_points)
    gateway = Gateway(
        config.gateway,
        points,
        keys,
        merge_blocs(config.blocs),
        LedgerWriter(db.open_ledger, state_dir / "spool", backlog=backlog),
        pools,
        GatewayMetrics(),
        Idempotency(db, stale_s=config.gateway.request_timeout_s + 60),
        build.budgets(config, db, shared=reuse_port),
        audit,
        build.rate_limits(config),
        build.admission(config, points),
        tracing.build(config.gateway.tracing),
    )
    judge = gateway.admission

    on_tenants = _tenants_applier(config, gateway)
    on_tenants(directory.tenants())

    def after_round() -> None:
        if judge is not None:
            eject_slow_points(gateway.points, judge.limits, config.gateway.ejection)

    # gateway.points, not points: registered points join and leave that list (registry/)
    poller = HealthPoller(pools, gateway.points, config.gateway.health_interval_s, after_round)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    roster = None
    if config.gateway.registry is not None:
        roster = build_roster(gateway, pools, db, config)
        tasks.append(loop.create_task(roster.run()))
    await _wait_ready(poller, gateway, local, ready_timeout_s)
    poller.start()
    tasks.append(
        loop.create_task(
            refresh_keys(config, db, state_dir, keys, KEY_REFRESH_S, directory, on_tenants)
        )
    )
    if audit is not None:
        settings = config.gateway.audit
        tasks.append(
            loop.create_task(checkpoints(audit, settings.checkpoint_s, db, settings.retention_days))
        )
    registry = None if roster is None else RegistryApi(roster)
    server = HttpServer(
        GatewayApp(gateway, admin_api(config, keys, db, gateway, directory), registry).handle,
        ServerLimits(max_body_bytes=config.gateway.max_body_bytes),
    )
    listen_tls = None if config.gateway.tls is None else server_context(config.gateway.tls)
    bound = await server.start(host, port, reuse_port=reuse_port, tls=listen_tls)
    internal = await _own_metrics(gateway, state_dir) if reuse_port else None
    return Running(gateway, server, poller, db, bound, local, demo, tasks, internal, roster)


async def _own_metrics(gateway: Gateway, state_dir: Path) -> HttpServer:
    """A worker's private loopback listener for its own metrics, so that whichever worker is
    scraped can merge all of them (telemetry/peers.py)."""

    async def handle(request: Request) -> Response:
        if request.path != "/metrics":
            return Response(404, b"")
        return Response(200, scrape(gateway), content_type=b"text/plain; version=0.0.4")

    internal = HttpServer(handle)
    port = await internal.start("127.0.0.1", 0)
    gateway.peers = Peers(state_dir)
    gateway.peers.register(port)
    return internal


async def checkpoints(audit: AuditLog, interval_s: float, db: StateStore, keep_days: int) -> None:
    """Sign the audit log's tree every `interval_s` (it also signs every N records), and once a
    day prune the content of records past retention."""
    next_prune = 0.0
    while True:
        if time.monotonic() >= next_prune:
            await asyncio.to_thread(prune_audit, db, keep_days)
            next_prune = time.monotonic() + 86_400
        await asyncio.sleep(interval_s)
        audit.checkpoint()


def prune_audit(db: StateStore, keep_days: int) -> int:
    """Prune audit content past retention; a database that is away is tried again tomorrow."""
    try:
        tables = db.open_audit()
        try:
            return tables.prune(int((time.time() - keep_days * 86_400) * 1000))
        finally:
            tables.close()
    except Exception as exc:  # maintenance in the background: never take the gateway down
        log.warning("could not prune the audit log: %s", type(exc).__name__)
        return 0


def admin_api(
    config: GrifoConfig, keys: KeyRing, db: StateStore, gateway: Gateway, directory: Directory
) -> AdminApi:
    return AdminApi(
        keys,
        db,
        directory.budgets,
        directory,
        lambda: point_states(gateway),
        lambda principal: dashboard_state(gateway, principal),
        lambda: gateway.budgets is not None,
    )


async def _wait_ready(
    poller: HealthPoller, gateway: Gateway, local: list[LocalPoint], timeout_s: float
) -> None:
    """Wait for the local points (remote ones may come later; /readyz says when)."""
    local_names = {lp.config.name for lp in local}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await poller.check_all()
        if all(p.healthy for p in gateway.points if p.name in local_names):
            return
        await asyncio.sleep(0.1)
