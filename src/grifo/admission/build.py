"""The admission stage as a topology asks for it: budgets (and where their reservations are
counted), rate limits, and per-point concurrency with its queue."""

from __future__ import annotations

from collections.abc import Sequence

from grifo.admission.budgets import Budgets
from grifo.admission.leases import Leases, LeaseStore
from grifo.admission.ratelimit import Limiter, RateLimits
from grifo.admission.reservations import BudgetStore, LocalReservations, ProcessReservations
from grifo.admission.shedding import Admission
from grifo.config.model import GrifoConfig, StoreConfig, TenantConfig
from grifo.store.select import StateStore, redis_url
from grifo.store.sqlite import StateDB
from grifo.topology import PointState


def admission(config: GrifoConfig, points: list[PointState]) -> Admission | None:
    """Concurrency limits per point and the priority queue (per gateway process)."""
    if not config.gateway.admission.enabled:
        return None
    weights = {t.name: t.weight for t in config.tenants}
    return Admission(config.gateway.admission, points, weights)


def apply_tenants(
    tenants: Sequence[TenantConfig],
    budgets: Budgets | None,
    limits: Limiter | None,
    admission: Admission | None,
) -> None:
    """Give budgets, rate limits and admission weights the effective tenants (the config's and
    those made over the admin API)."""
    if budgets is not None:
        budgets.set_tenants({t.name: t.budget for t in tenants if t.budget is not None})
    if limits is not None:
        limits.set_tenants({t.name: t.limits for t in tenants if t.limits is not None})
    if admission is not None:
        admission.set_weights({t.name: t.weight for t in tenants})


def rate_limits(config: GrifoConfig) -> Limiter:
    """Limits in Redis when replicas share one (`store.redis_url`), else in this process.
    Built even with none configured: tenants made over the admin API may have some."""
    tenants = {t.name: t.limits for t in config.tenants if t.limits is not None}
    keys = {k.id: k.limits for k in config.keys if k.limits is not None}
    url = redis_url(config.gateway.store)
    if url is None:
        return RateLimits(tenants, keys)
    from grifo.admission.shared_limits import SharedLimits
    from grifo.store.redis_limits import RedisLimiter

    limiter = RedisLimiter(url, prefix=config.gateway.store.redis_prefix)
    return SharedLimits(limiter, tenants, keys)


def budgets(config: GrifoConfig, db: StateStore, *, shared: bool = False) -> Budgets | None:
    """Built even with no budget configured (tenants made over the admin API may have one),
    unless there is nowhere to count reservations: a shared PostgreSQL without Redis."""
    tenants = {t.name: t.budget for t in config.tenants if t.budget is not None}
    keys = {k.id: k.budget for k in config.keys if k.budget is not None}
    if not can_reserve(config.gateway.store, db) and not tenants and not keys:
        return None
    store = reservations(config.gateway.store, db, shared=shared)
    leases = None
    lease_requests = config.gateway.store.budget_lease_requests
    if lease_requests and isinstance(store, LeaseStore):
        leases = Leases(store, requests=lease_requests)
    return Budgets(
        store,
        db,
        tenants,
        keys,
        config.gateway.request_timeout_s,
        config.gateway.store.budget_outage,
        leases,
    )


def can_reserve(store: StoreConfig, db: StateStore) -> bool:
    """Whether budgets can keep their reservations: in Redis, or in the SQLite state."""
    return redis_url(store) is not None or isinstance(db, StateDB)


def reservations(
    store: StoreConfig, db: StateStore, *, shared: bool
) -> BudgetStore | ProcessReservations:
    """Redis when configured (replicas); else the SQLite state database when processes share
    it (`--workers`), or this process's memory when it is the only one."""
    url = redis_url(store)
    if url is not None:
        from grifo.store.redis_budgets import RedisReservations

        return RedisReservations(url, db.spent, prefix=store.redis_prefix)
    assert isinstance(db, StateDB), "checked with the config: PostgreSQL budgets need Redis"
    return LocalReservations(db) if shared else ProcessReservations(db)
