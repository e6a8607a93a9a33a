"""Budgets: 100 concurrent requests against the last cents never overspend a strict budget."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import openai

from grifo.admission.budgets import Budgets, _check, prompt_bound
from grifo.config.model import BudgetConfig
from grifo.security.keys import Principal
from grifo.store.ledger import LedgerWriter
from grifo.store.records import Amount, BudgetCheck, LedgerEntry
from grifo.store.sqlite import StateDB
from grifo.wire import requests as wire
from tests.support.fabric import CHAT, Fabric

TOPOLOGY = """
gateway: {demo_keys: true, health_interval_s: 0.2, request_timeout_s: 1}
points:
  - {name: lima-edge, site: lima, region: sa-west, jurisdiction: PE, tier: edge, rtt_ms: 4,
     engine: {kind: fake, embeddings: fake},
     prices: {usd_per_hour: 0.04, default: {input_usd_per_1m: 20.0, output_usd_per_1m: 40.0}}}
tenants:
  - {name: strict, budget: {usd: 0.01, period: day, mode: strict}}
  - {name: soft, budget: {usd: 0.01, period: day, mode: soft}}
  - {name: tokens, budget: {tokens: 300, period: month}}
  - {name: free}
"""
LIMIT_MICROS = 10_000


def _hammer(fab: Fabric, tenant: str, n: int) -> list[str]:
    """n concurrent requests; the outcome of each: ok, or the error code."""
    client = fab.client(tenant)

    def one(i: int) -> str:
        try:
            client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": f"spend {i}"}], max_tokens=4
            )
        except openai.RateLimitError as exc:
            return str(exc.code)
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        return list(pool.map(one, range(n)))


def _until_refused(fab: Fabric, tenant: str) -> list[str]:
    client = fab.client(tenant)
    outcomes = []
    for i in range(500):
        try:
            client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "user", "content": f"spend {i % 100}"}],
                max_tokens=4,
            )
        except openai.RateLimitError as exc:
            outcomes.append(str(exc.code))
            return outcomes
        outcomes.append("ok")
    raise AssertionError("the budget never ran out")


def _spent(fab: Fabric, tenant: str, outcomes: list[str]) -> int:
    expected = outcomes.count("ok")
    rows: list[LedgerEntry] = []
    for _ in range(100):
        rows = [e for e in fab.running.db.ledger() if e.tenant == tenant]
        if len(rows) >= expected:
            break
        time.sleep(0.05)
    assert len(rows) == expected
    return sum(e.cost_micros for e in rows)


def test_strict_budget_is_never_exceeded(tmp_path: Path) -> None:
    fab = Fabric.from_yaml(TOPOLOGY, tmp_path)
    try:
        outcomes = _hammer(fab, "strict", 100)
        assert "insufficient_quota" in outcomes
        assert "ok" in outcomes
        assert _spent(fab, "strict", outcomes) <= LIMIT_MICROS
        # One at a time, strict admits while the worst case still fits: it ends close below.
        outcomes += _until_refused(fab, "strict")
        spent = _spent(fab, "strict", outcomes)
        assert LIMIT_MICROS - max(_worst(fab, i) for i in range(100)) < spent <= LIMIT_MICROS
        free = _hammer(fab, "free", 20)
        assert free == ["ok"] * 20
    finally:
        fab.close()


def _worst(fab: Fabric, i: int) -> int:
    """The gateway's own worst case for request `i` of `_hammer`."""
    gateway = fab.running.gateway
    assert gateway.budgets is not None
    body = wire.decode(
        wire.ChatCompletionRequest,
        json.dumps(
            {
                "model": CHAT,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": f"spend {i}"}],
            }
        ).encode(),
    )
    return gateway.budgets.worst_case(body, gateway.placement.rank(CHAT, None, 4, 3)).micros


def test_soft_budget_overspends_at_most_one_worst_case(tmp_path: Path) -> None:
    fab = Fabric.from_yaml(TOPOLOGY, tmp_path)
    try:
        outcomes = _hammer(fab, "soft", 100)
        assert "insufficient_quota" in outcomes
        worst = max(_worst(fab, i) for i in range(100))
        assert _spent(fab, "soft", outcomes) <= LIMIT_MICROS + worst
        # One at a time, soft admits while spending is under the limit: the last one crosses it.
        outcomes += _until_refused(fab, "soft")
        assert LIMIT_MICROS <= _spent(fab, "soft", outcomes) <= LIMIT_MICROS + worst
    finally:
        fab.close()


def test_reservations_are_released_and_spending_is_recounted_from_the_ledger(
    tmp_path: Path,
) -> None:
    now = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)
    db = StateDB(tmp_path / "grifo.db")
    writer = LedgerWriter(db.open_ledger, tmp_path / "spool")
    writer.record(
        LedgerEntry(
            "r1",
            int(now.timestamp() * 1000),
            "t",
            "k",
            "/v1/completions",
            "m",
            "p",
            "PE",
            1,
            1,
            250,
            "ok",
            "point",
            1.0,
        )
    )
    writer.close()
    day = BudgetCheck("tenant:t", int(now.replace(hour=0).timestamp() * 1000), 300, True)
    try:
        assert db.reserve([day], Amount(51, 0)) == day, "250 spent + 51 > 300 must be refused"
        assert db.reserve([day], Amount(50, 0)) is None
        db.settle([day], Amount(50, 0), Amount(10, 0))  # 40 released, 10 spent: 260
        assert db.reserve([day], Amount(41, 0)) == day
        assert db.reserve([day], Amount(40, 0)) is None
        db.reset_reservations()  # a restart: spending is recounted from the ledger (250)
        assert db.reserve([day], Amount(50, 0)) is None
    finally:
        db.close()


def test_tenant_and_key_budgets_are_reserved_together(tmp_path: Path) -> None:
    now = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)
    db = StateDB(tmp_path / "grifo.db")
    start = int(now.replace(hour=0).timestamp() * 1000)
    tenant = BudgetCheck("tenant:t", start, 1000, True)
    key = BudgetCheck("key:k", start, 100, True)
    try:
        assert db.reserve([tenant, key], Amount(101, 0)) == key
        assert db.reserve([tenant], Amount(900, 0)) is None, "the refused pair reserved nothing"
        assert db.reserve([tenant, key], Amount(101, 0)) in (tenant, key)
    finally:
        db.close()


def test_budget_periods_are_utc_calendar_day_and_month() -> None:
    budgets = Budgets(
        _NoStore(),
        _NoStore(),
        {"t": BudgetConfig(usd=1.0, period="month")},
        {"k": BudgetConfig(usd=0.5, period="day", mode="soft")},
        1.0,
    )
    assert budgets.applies(Principal("t", "x", None))
    assert budgets.applies(Principal("other", "k", None))
    assert not budgets.applies(Principal("other", "x", None))
    now = dt.datetime(2026, 11, 25, 12, 30, tzinfo=dt.UTC)
    month, day = (
        _check("tenant:t", BudgetConfig(usd=1.0), now),
        _check("key:k", BudgetConfig(usd=0.5, period="day", mode="soft"), now),
    )
    assert month is not None
    assert day is not None
    assert month.period_start_ms == int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1000)
    assert day.period_start_ms == int(dt.datetime(2026, 11, 25, tzinfo=dt.UTC).timestamp() * 1000)
    assert (month.limit_micros, month.strict, day.limit_micros, day.strict) == (
        1_000_000,
        True,
        500_000,
        False,
    )


class _NoStore:
    up = True

    async def reserve(
        self, checks: list[BudgetCheck], worst: Amount, request_id: str, hold_s: float
    ) -> BudgetCheck | None:
        return None

    def settle(
        self, checks: list[BudgetCheck], request_id: str, reserved: Amount, actual: Amount
    ) -> None:
        return None

    async def close(self) -> None:
        return None

    def spent_since(self, tenant: str, since_ms: int) -> int:
        return 0


class _Spend:
    def __init__(self, rows: list[tuple[dt.datetime, int]]) -> None:
        self.rows = rows

    def spent_since(self, tenant: str, since_ms: int) -> int:
        return sum(c for t, c in self.rows if t.timestamp() * 1000 >= since_ms)


def test_burn_rate_projects_to_the_period_end() -> None:
    from grifo.admission.burn import burn_rates

    now = dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC)
    spend = _Spend(
        [
            (dt.datetime(2026, 11, 2, tzinfo=dt.UTC), 400_000),  # earlier this month
            (now - dt.timedelta(minutes=30), 10_000),  # the last hour: 10,000 micro-USD
        ]
    )
    [burn] = burn_rates(spend, {"t": BudgetConfig(usd=1.0)}, now)
    assert (burn.limit_micros, burn.spent_micros, burn.rate_micros_per_hour) == (
        1_000_000,
        410_000,
        10_000,
    )
    hours_left = (dt.datetime(2026, 12, 1, tzinfo=dt.UTC) - now).total_seconds() / 3600
    assert burn.projected_micros == 410_000 + round(10_000 * hours_left)
    assert burn.runs_out_at == now + dt.timedelta(hours=59)  # 590,000 left at 10,000 an hour
    [calm] = burn_rates(_Spend([]), {"t": BudgetConfig(usd=1.0)}, now)
    assert calm.runs_out_at is None


def test_budget_metrics_are_scraped(tmp_path: Path) -> None:
    import urllib.request

    fab = Fabric.from_yaml(TOPOLOGY, tmp_path)
    try:
        _until_refused(fab, "strict")
        with urllib.request.urlopen(f"{fab.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        fab.close()
    assert 'grifo_budget_micros{kind="limit",tenant="strict"} 10000.0' in text
    assert 'grifo_budget_exhaustion_timestamp_seconds{tenant="strict"}' in text
    config = tmp_path / "grifo.yaml"
    config.write_text(TOPOLOGY)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "grifo",
            "budgets",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    strict_line = next(line for line in out.splitlines() if line.startswith("strict"))
    assert "10,000" in strict_line
    assert "soft" in out


def test_token_budget_is_never_exceeded(tmp_path: Path) -> None:
    fab = Fabric.from_yaml(TOPOLOGY, tmp_path)
    try:
        outcomes = _hammer(fab, "tokens", 100)
        assert "insufficient_quota" in outcomes
        assert "ok" in outcomes
        _spent(fab, "tokens", outcomes)  # waits for the ledger
        rows = [e for e in fab.running.db.ledger() if e.tenant == "tokens"]
        assert sum(e.prompt_tokens + e.completion_tokens for e in rows) <= 300
    finally:
        fab.close()


def test_token_counts_and_money_are_both_checked(tmp_path: Path) -> None:
    start = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1000)
    both = BudgetCheck("tenant:b", start, 1000, True, 50)
    db = StateDB(tmp_path / "grifo.db")
    try:
        assert db.reserve([both], Amount(10, 51)) == both, "tokens over the limit"
        assert db.reserve([both], Amount(1001, 1)) == both, "money over the limit"
        assert db.reserve([both], Amount(1000, 50)) is None
    finally:
        db.close()


def test_worst_case_is_the_dearest_candidates_price_of_the_most_a_request_can_use(
    tmp_path: Path,
) -> None:
    from grifo.admission.reservations import ProcessReservations
    from grifo.metering.pricing import cost_micros
    from grifo.placement.scoring import Candidate
    from grifo.topology import ModelCard
    from tests.test_placement import make_point

    db = StateDB(tmp_path / "state.db")
    budgets = Budgets(ProcessReservations(db), db, {}, {}, request_timeout_s=30)
    cheap = make_point("cheap", "PE", input_usd=1.0, output_usd=2.0, usd_per_hour=0.5)
    dear_out = make_point("dear-out", "PE", input_usd=0.5, output_usd=9.0, usd_per_hour=0.1)
    dear_in = make_point("dear-in", "PE", input_usd=30.0, output_usd=1.0, usd_per_hour=3.0)
    for point, context in ((cheap, 2048), (dear_out, 2048), (dear_in, 512)):
        point.models = {CHAT: ModelCard(CHAT, "chat", context)}
    candidates = [Candidate(p, 0.0) for p in (cheap, dear_out, dear_in)]
    chat = wire.decode_for(
        "/v1/chat/completions",
        json.dumps({"model": CHAT, "messages": [{"role": "user", "content": "hi " * 40}]}).encode(),
    )
    prompt = prompt_bound(chat)
    busy_ns = 10 * 10**9

    def at(point: object, prompt: int, completion: int) -> int:
        assert hasattr(point, "price")
        return cost_micros(
            point.price(CHAT), point.usd_per_hour_micros, prompt, completion, busy_ns
        )

    worst = budgets.worst_case(chat, candidates, timeout_s=10)
    # no max_tokens: as many as each point's model allows (2048, 2048, 512)
    expected = max(at(cheap, prompt, 2048), at(dear_out, prompt, 2048), at(dear_in, prompt, 512))
    assert worst == Amount(expected, prompt + 2048)
    assert prompt > 120  # 40 words of text, and the template's share

    run = wire.decode_for(
        "/v1/grifo/agent-runs",
        json.dumps({"model": CHAT, "input": "go", "limits": {"max_tokens": 100}}).encode(),
    )
    # a run's tokens may all be prompt or all completion: the dearer rate of each point
    expected = max(max(at(p, 100, 0), at(p, 0, 100)) for p in (cheap, dear_out, dear_in))
    assert budgets.worst_case(run, candidates, timeout_s=10) == Amount(expected, 100)
