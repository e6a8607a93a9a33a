"""One planning run: tenants for the trace, a service model per point, every strategy simulated
and summarised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from grifo.config.model import GrifoConfig
from grifo.planner import tenants as tenants_
from grifo.planner.metrics import Summary, summarise
from grifo.planner.service import Calibration, ServiceModel
from grifo.planner.sim import SimResult, default_model_name, point_states, simulate
from grifo.planner.tenants import Sender
from grifo.planner.trace import TraceRequest


@dataclass(slots=True)
class Plan:
    config: GrifoConfig
    requests: list[TraceRequest]
    model: str
    models: dict[str, ServiceModel]
    tenants: dict[int, str]
    senders: dict[str, Sender]
    slo_ms: float
    seed: int
    gateway_ms: float
    results: list[SimResult] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)

    def summary(self, strategy: str) -> Summary:
        return next(s for s in self.summaries if s.strategy == strategy)


def run_plan(
    config: GrifoConfig,
    requests: Sequence[TraceRequest],
    strategy_names: Sequence[str],
    calibration: Calibration,
    *,
    slo_ms: float = 2000.0,
    seed: int = 0,
    gateway_ms: float = 1.0,
    model: str | None = None,
) -> Plan:
    senders = tenants_.senders(config)
    plan = Plan(
        config=config,
        requests=list(requests),
        model=model or default_model_name(config.points),
        models={p.name: calibration.model_for(p) for p in config.points},
        tenants=tenants_.assign(requests, list(senders), seed),
        senders=senders,
        slo_ms=slo_ms,
        seed=seed,
        gateway_ms=gateway_ms,
    )
    prices = {s.name: s for s in point_states(config, plan.model)}
    for name in strategy_names:
        result = simulate(
            config,
            plan.requests,
            plan.tenants,
            senders,
            name,
            plan.models,
            model=plan.model,
            gateway_ms=gateway_ms,
        )
        plan.results.append(result)
        plan.summaries.append(summarise(result, slo_ms, prices))
    return plan
