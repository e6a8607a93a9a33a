"""What `/metrics` shows of a gateway: its own counters plus the state read at scrape time
(points up, stores up, spool backlogs, the audit log's counts, budgets' burn)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from grifo.admission.burn import Burn
from grifo.errors import StoreUnavailableError

if TYPE_CHECKING:
    from grifo.service import Gateway


def scrape(gateway: Gateway) -> bytes:
    metrics = gateway.metrics
    for point in gateway.points:
        metrics.point_up.labels(point.name).set(1 if point.healthy else 0)
    metrics.store_up.labels("ledger").set(1 if gateway.ledger.up else 0)
    metrics.spool_backlog.set(gateway.ledger.pending_segments)
    metrics.catch_up(metrics.limits_unchecked, getattr(gateway.limits, "unchecked", 0))
    if gateway.audit is not None:
        metrics.store_up.labels("audit").set(1 if gateway.audit.up else 0)
        metrics.audit_spool_backlog.set(gateway.audit.pending_segments)
        metrics.catch_up(metrics.audit_records, gateway.audit.appended)
    attester = gateway.answers.attester
    if attester is not None:
        metrics.catch_up(metrics.attestations, attester.signed)
        metrics.catch_up(metrics.attestation_signatures, attester.batches)
    burns: list[Burn] = []
    if gateway.budgets is not None:
        metrics.store_up.labels("budgets").set(1 if gateway.budgets.store_up else 0)
        metrics.catch_up(metrics.unchecked, gateway.budgets.unchecked)
        if gateway.budgets.leases is not None:
            metrics.catch_up(metrics.leased, gateway.budgets.leases.taken)
        with contextlib.suppress(StoreUnavailableError):
            burns = gateway.budgets.burn()
    for burn in burns:
        for kind, value in (
            ("limit", burn.limit_micros),
            ("spent", burn.spent_micros),
            ("projected", burn.projected_micros),
        ):
            metrics.budget.labels(burn.tenant, kind).set(value)
        eta = burn.runs_out_at.timestamp() if burn.runs_out_at is not None else 0
        metrics.budget_exhaustion.labels(burn.tenant).set(eta)
    return metrics.render()
