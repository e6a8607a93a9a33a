"""Burn rate: a budget's recent spending rate, projected to the end of its period.

rate = spending over the last `window` / window; projected = spent so far + rate × time left in
the period; a budget runs out `(limit − spent) / rate` from now if that is before the period
ends. Read from the ledger, so every gateway worker and restart agrees.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from grifo.config.model import BudgetConfig


class SpendSource(Protocol):
    def spent_since(self, tenant: str, since_ms: int) -> int: ...


@dataclass(frozen=True, slots=True)
class Burn:
    tenant: str
    limit_micros: int
    spent_micros: int
    rate_micros_per_hour: int
    projected_micros: int
    runs_out_at: dt.datetime | None  # None: not within this period at the current rate


def period_bounds(budget: BudgetConfig, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if budget.period == "day":
        return start, start + dt.timedelta(days=1)
    start = start.replace(day=1)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


def burn_rates(
    source: SpendSource,
    budgets: Mapping[str, BudgetConfig],
    now: dt.datetime,
    window: dt.timedelta = dt.timedelta(hours=1),
) -> list[Burn]:
    out = []
    for tenant, budget in sorted(budgets.items()):
        if budget.usd is None:
            continue  # a tokens-only budget: no money to burn
        start, end = period_bounds(budget, now)
        spent = source.spent_since(tenant, _ms(start))
        recent = source.spent_since(tenant, _ms(max(now - window, start)))
        elapsed_s = max((now - max(now - window, start)).total_seconds(), 1.0)
        rate_per_s = recent / elapsed_s
        left_s = (end - now).total_seconds()
        limit = round(budget.usd * 1_000_000)
        runs_out = None
        if rate_per_s > 0 and spent < limit:
            eta = now + dt.timedelta(seconds=(limit - spent) / rate_per_s)
            runs_out = eta if eta < end else None
        elif spent >= limit:
            runs_out = now
        out.append(
            Burn(
                tenant,
                limit,
                spent,
                round(rate_per_s * 3600),
                spent + round(rate_per_s * left_s),
                runs_out,
            )
        )
    return out


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)
