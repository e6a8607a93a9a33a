"""Budgets: reserve a request's worst-case cost before dispatch, settle to the real cost after.

Worst case = an upper bound of the prompt's tokens (a token is at least one byte, plus template
overhead) and `max_tokens`, at the dearest candidate's token prices, plus that point's hourly
price for the whole request deadline (a request cannot hold a point longer: the gateway stops
reading at the deadline). Reservations for a
tenant's and a key's budget are taken together, atomically, in the shared state database.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from grifo.admission.burn import Burn, SpendSource, burn_rates
from grifo.admission.leases import Lease, Leases
from grifo.admission.reservations import Batched, BudgetStore, ProcessReservations
from grifo.config.model import BudgetConfig, OutagePolicy
from grifo.errors import BudgetExceededError, StoreUnavailableError
from grifo.placement.scoring import Candidate
from grifo.security.keys import Principal
from grifo.store.records import Amount, Ask, BudgetCheck, Settlement
from grifo.store.sqlite_budgets import take
from grifo.wire import requests as wire

_NS_PER_HOUR = 3_600_000_000_000
_TEMPLATE_TOKENS = 64  # chat template and default system prompt
_PER_MESSAGE_TOKENS = 8


_Active = tuple[dt.date, list[BudgetCheck], list[list[int]] | None]  # day, checks, counters


@dataclass(slots=True)
class Reservation:
    request_id: str
    checks: list[BudgetCheck]
    worst: Amount
    open: bool = True
    rows: list[list[int]] | None = None  # the counters, when this process keeps them
    leases: list[Lease] | None = None  # the leases it was taken from


class Budgets:
    """Budgets of tenants and keys. When the store is unreachable, `on_outage` decides:
    `fail-closed` refuses (503), `fail-open` admits without a reservation (counted in
    `unchecked`); `auto` is closed for a strict budget and open for a soft one. With
    `leases`, requests that fit in this process's leases of a shared store's budgets are
    reserved without asking the store."""

    def __init__(
        self,
        store: BudgetStore | ProcessReservations,
        spend: SpendSource,
        tenants: Mapping[str, BudgetConfig],
        keys: Mapping[str, BudgetConfig],
        request_timeout_s: float,
        on_outage: OutagePolicy = "auto",
        leases: Leases | None = None,
    ) -> None:
        self._store: Batched | ProcessReservations = (
            store if isinstance(store, ProcessReservations) else Batched(store)
        )
        self._spend = spend
        self._tenants = tenants
        self._keys = keys
        self._timeout_ns = int(request_timeout_s * 1e9)
        self._on_outage = on_outage
        self.leases = leases
        self.unchecked = 0
        self._process = store if isinstance(store, ProcessReservations) else None
        self._active: dict[tuple[str, str], _Active] = {}
        self._day = dt.date(1970, 1, 1)
        self._day_ends = 0.0  # epoch seconds of the next UTC midnight

    def set_tenants(self, tenants: Mapping[str, BudgetConfig]) -> None:
        """Replace the tenants' budgets (tenants made over the admin API come and go)."""
        if dict(tenants) != dict(self._tenants):
            self._tenants = dict(tenants)
            self._active.clear()

    def burn(self, now: dt.datetime | None = None) -> list[Burn]:
        """Every tenant budget's burn rate and projection (see `burn.py`)."""
        return burn_rates(self._spend, self._tenants, now or dt.datetime.now(dt.UTC))

    def _today(self) -> dt.date:
        """The UTC date, from a cache that lasts until midnight (datetime.now is slow)."""
        wall = time.time()
        if wall >= self._day_ends:
            self._day = dt.datetime.fromtimestamp(wall, dt.UTC).date()
            self._day_ends = (wall // 86_400 + 1) * 86_400
        return self._day

    def _checks(
        self, principal: Principal, day: dt.date
    ) -> tuple[list[BudgetCheck], list[list[int]] | None]:
        """The budgets a caller's request counts against on `day`, and their counters when
        this process keeps them (cached for the day: they only change at midnight; hashing
        the configs on every request was the costly part)."""
        who = (principal.tenant, principal.key_id)
        cached = self._active.get(who)
        if cached is not None and cached[0] == day:
            return cached[1], cached[2]
        checks = [
            _check(f"tenant:{principal.tenant}", self._tenants.get(principal.tenant), day),
            _check(f"key:{principal.key_id}", self._keys.get(principal.key_id), day),
        ]
        active = [c for c in checks if c is not None]
        rows = None if self._process is None else self._process.rows(active)
        if len(self._active) > 100_000:
            self._active.clear()
        self._active[who] = (day, active, rows)
        return active, rows

    def applies(self, principal: Principal) -> bool:
        return principal.tenant in self._tenants or principal.key_id in self._keys

    async def reserve(
        self,
        principal: Principal,
        body: wire.InferenceRequest,
        candidates: Sequence[Candidate],
        request_id: str,
        timeout_s: float | None = None,
        now: dt.datetime | None = None,
    ) -> Reservation:
        """Reserve the worst case in every budget that applies, or raise 429."""
        day = now.date() if now is not None else self._today()
        active, rows = self._checks(principal, day)
        worst = self.worst_case(body, candidates, timeout_s)
        if rows is not None:  # this process keeps the counters: no store to ask
            refused = take(active, rows, worst)
            if refused is not None:
                _refuse(refused, worst)
            return Reservation(request_id, active, worst, rows=rows)
        hold_s = self._timeout_ns / 1e9 if timeout_s is None else timeout_s
        if self.leases is not None:
            leases = self.leases.take(active, worst, hold_s)
            if leases is not None:
                return Reservation(request_id, active, worst, leases=leases)
        try:
            refused = await self._store.reserve(Ask(active, worst, request_id, hold_s))
        except StoreUnavailableError:
            closed = self._on_outage == "fail-closed" or (
                self._on_outage == "auto" and any(c.strict for c in active)
            )
            if closed:
                raise
            self.unchecked += 1
            return Reservation(request_id, active, worst, open=False)
        if refused is not None:
            _refuse(refused, worst)
        return Reservation(request_id, active, worst)

    def settle(self, reservation: Reservation, actual: Amount) -> None:
        if reservation.open:
            reservation.open = False
            if reservation.rows is not None:
                ProcessReservations.give_back(reservation.rows, reservation.worst, actual)
                return
            if reservation.leases is not None and self.leases is not None:
                self.leases.give_back(reservation.leases, reservation.worst, actual)
                return
            self._store.settle(
                Settlement(reservation.checks, reservation.request_id, reservation.worst, actual)
            )

    def release(self, reservation: Reservation) -> None:
        self.settle(reservation, Amount(0, 0))

    @property
    def store_up(self) -> bool:
        return self._store.store.up

    async def close(self) -> None:
        self._store.flush()
        if self.leases is not None:
            await self.leases.close()
        await self._store.store.close()

    def worst_case(
        self,
        body: wire.InferenceRequest,
        candidates: Sequence[Candidate],
        timeout_s: float | None = None,
    ) -> Amount:
        """Upper bound of what `body` can cost at any candidate, holding it for the request's
        deadline (`timeout_s`, default the gateway's request timeout)."""
        busy_ns = self._timeout_ns if timeout_s is None else int(timeout_s * 1e9)
        prompt = prompt_bound(body)
        model = body.model
        limit = 0 if isinstance(body, wire.EmbeddingRequest) else body.token_limit()
        run = isinstance(body, wire.AgentRunRequest)
        worst_micros = worst_tokens = 0
        for candidate in candidates:
            point = candidate.point
            completion = limit
            if completion is None:  # as many as the model's context allows
                card = point.models.get(model)
                completion = (card.context_length if card else 0) or wire.MAX_TOKENS_LIMIT
            price = point.price(model)
            # cost_micros(price, hourly, prompt, completion, busy_ns), spelled out: this runs
            # for every request with a budget
            rate_in, rate_out = price.input_micros_per_1m, price.output_micros_per_1m
            if run:  # its tokens may be prompt or completion
                total = (prompt + completion) * max(rate_in, rate_out)
            else:
                total = prompt * rate_in + completion * rate_out
            tokens_cost = -(-total // 1_000_000)
            hardware = -(-(point.usd_per_hour_micros * busy_ns) // _NS_PER_HOUR)
            worst_micros = max(worst_micros, tokens_cost + hardware)
            worst_tokens = max(worst_tokens, prompt + completion)
        return Amount(worst_micros, worst_tokens)


def _refuse(check: BudgetCheck, worst: Amount) -> NoReturn:
    scope = check.scope.split(":", 1)[0]
    raise BudgetExceededError(
        f"the {scope}'s budget for this period cannot cover this request (worst case "
        f"{worst.micros} micro-USD, {worst.tokens} tokens); raise the budget or lower max_tokens"
    )


def prompt_bound(body: wire.InferenceRequest) -> int:
    """At least as many tokens as the prompt has: a token is at least one byte."""
    if isinstance(body, wire.EmbeddingRequest):
        return sum(len(t.encode()) + 2 for t in body.texts())
    if isinstance(body, wire.ChatCompletionRequest):
        return _TEMPLATE_TOKENS + sum(
            len(m.text().encode()) + _PER_MESSAGE_TOKENS for m in body.messages
        )
    if isinstance(body, wire.AgentRunRequest):
        return 0  # its `max_tokens` bounds prompt and completion tokens of every step
    return len(body.prompt_text().encode()) + _PER_MESSAGE_TOKENS


def _check(scope: str, budget: BudgetConfig | None, day: dt.date) -> BudgetCheck | None:
    if budget is None:
        return None
    return _check_on(scope, budget, day)


@functools.lru_cache(maxsize=1024)
def _check_on(scope: str, budget: BudgetConfig, day: dt.date) -> BudgetCheck:
    """The check for `scope` on a UTC `day` (the same all day long: computed once)."""
    start = dt.datetime(
        day.year, day.month, 1 if budget.period == "month" else day.day, tzinfo=dt.UTC
    )
    limit = None if budget.usd is None else round(budget.usd * 1_000_000)
    strict = budget.mode == "strict"
    return BudgetCheck(scope, int(start.timestamp() * 1000), limit, strict, budget.tokens)
