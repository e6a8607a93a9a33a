"""What each strategy achieved: latency, SLO attainment, cost, violations, utilisation.

- Latency is arrival at the gateway to the whole answer back; TTFT to the first token back.
- SLO attainment: the share of all requests answered within `slo_ms` (a refused request
  misses it).
- Cost is pricing.py's per request (its tokens, plus its share of its point's busy hour),
  summed; per month it is that total times a 30-day month over the replayed span (first to
  last arrival, after `--speed`): a month of traffic at the replayed rate. `capacity` is the
  other view of hardware: the hourly price of every point the strategy used, for the whole
  month.
- Utilisation: the share of the simulated time (0 to the last answer) a point had at least one
  generation running.
- Tasks: requests with dependent steps; a task's latency runs from its first request's
  arrival to its last answer (refused tasks are left out of the percentiles, counted apart).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from grifo.planner.sim import SimResult
from grifo.planner.strategies import RESPECTS_POLICY
from grifo.topology import PointState

MONTH_S = 30 * 86400
HOURS_PER_MONTH = MONTH_S / 3600


@dataclass(frozen=True, slots=True)
class Summary:
    strategy: str
    respects_policy: bool
    requests: int
    served: int
    refused: int
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    slo_ms: float
    slo_attainment: float
    violations: int
    over_context: int
    token_micros: int
    hardware_micros: int
    monthly_usd: float
    monthly_token_usd: float
    monthly_hardware_usd: float
    capacity_usd_month: float
    tasks: int
    tasks_refused: int
    task_p50_ms: float
    task_p99_ms: float
    utilisation: dict[str, float]
    share: dict[str, float]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(
    result: SimResult, slo_ms: float, prices: Mapping[str, PointState] | None = None
) -> Summary:
    """`prices`: the points by name, for the capacity view (hourly prices)."""
    outs = result.outcomes
    served = [o for o in outs if o.point is not None]
    latencies = [o.latency_ms for o in served]
    ttfts = [o.ttft_ms for o in served]
    tokens = sum(o.token_micros for o in served)
    hardware = sum(o.hardware_micros for o in served)
    per_month = MONTH_S / result.span_s if result.span_s > 0 else math.nan
    by_task: dict[int, list[float]] = defaultdict(list)
    firsts: dict[int, float] = {}
    multi = {t for t, n in Counter(o.task for o in outs).items() if n > 1}
    refused_tasks = {o.task for o in outs if o.point is None and o.task in multi}
    for o in outs:
        if o.task in multi and o.task not in refused_tasks:
            by_task[o.task].append(o.done_s)
            firsts[o.task] = min(firsts.get(o.task, math.inf), o.arrival_s)
    task_ms = [(max(done) - firsts[t]) * 1000 for t, done in by_task.items()]
    counts = Counter(o.point for o in served)
    used = [name for name in result.usage if counts.get(name)]
    capacity = sum(
        prices[name].usd_per_hour_micros / 1e6 * HOURS_PER_MONTH for name in used if prices
    )
    return Summary(
        strategy=result.strategy,
        respects_policy=RESPECTS_POLICY.get(result.strategy, True),
        requests=len(outs),
        served=len(served),
        refused=len(outs) - len(served),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        slo_ms=slo_ms,
        slo_attainment=sum(x <= slo_ms for x in latencies) / len(outs) if outs else math.nan,
        violations=sum(o.violation for o in served),
        over_context=sum(o.over_context for o in served),
        token_micros=tokens,
        hardware_micros=hardware,
        monthly_usd=(tokens + hardware) / 1e6 * per_month,
        monthly_token_usd=tokens / 1e6 * per_month,
        monthly_hardware_usd=hardware / 1e6 * per_month,
        capacity_usd_month=capacity,
        tasks=len(task_ms),
        tasks_refused=len(refused_tasks),
        task_p50_ms=percentile(task_ms, 50),
        task_p99_ms=percentile(task_ms, 99),
        utilisation={
            name: u.busy_s / result.end_s if result.end_s > 0 else 0.0
            for name, u in result.usage.items()
        },
        share={name: counts.get(name, 0) / len(served) if served else 0.0 for name in result.usage},
    )
