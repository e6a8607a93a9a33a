"""The discrete-event simulation: one heap of timed events, no simulation library.

A request arrives at the gateway, which asks the strategy for a point (for `grifo`, the real
`PlacementIndex` over real `PointState`s); it reaches the point `gateway_ms` + rtt/2 later,
waits for a slot, runs under the point's `ServiceModel` (processor sharing among the running
generations, see service.py), and its answer is back rtt/2 after it finished. The gateway's
in-flight count of each point (`gateway_in_flight`) changes at dispatch and answer, as in
dispatch; every `gateway.health_interval_s` the points' own queue and running counts are
written into `queued` and `point_in_flight`, as the health poller does. Each request's share of
its point's busy time comes from the point's own `BusyClock`, and its cost from pricing.py.

A request that depends on another (trace.py) arrives when that one's answer does; when a
request is refused, the rest of its task is refused too. Not simulated: failures, retries,
hedges, admission control, rate limits and budgets.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from grifo.config.model import GrifoConfig, PointConfig
from grifo.metering.pricing import hardware_cost_micros, token_cost_micros
from grifo.planner import strategies
from grifo.planner.service import ServiceModel, model_id
from grifo.planner.tenants import Sender
from grifo.planner.trace import TraceRequest
from grifo.topology import ModelCard, PointState, build_point_state

_EPS_S = 1e-9
ARRIVE, REACH, FINISH, ANSWER, POLL = range(5)


@dataclass(slots=True)
class Outcome:
    index: int
    task: int
    tenant: str
    point: str | None  # None: refused
    arrival_s: float
    first_token_s: float = math.nan
    done_s: float = math.nan
    prompt_tokens: int = 0
    completion_tokens: int = 0
    violation: bool = False
    over_context: bool = False
    token_micros: int = 0
    hardware_micros: int = 0

    @property
    def latency_ms(self) -> float:
        return (self.done_s - self.arrival_s) * 1000

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_s - self.arrival_s) * 1000


@dataclass(slots=True)
class PointUsage:
    busy_s: float = 0.0  # time with at least one generation running
    served: int = 0


@dataclass(slots=True)
class SimResult:
    strategy: str
    outcomes: list[Outcome]
    span_s: float  # first to last arrival
    end_s: float  # the last answer
    usage: dict[str, PointUsage]


@dataclass(slots=True)
class _Job:
    outcome: Outcome
    first_left: float
    left: float


@dataclass(slots=True)
class _Point:
    state: PointState
    model: ServiceModel
    context: int  # tokens; 0: unknown
    waiting: deque[_Job] = field(default_factory=deque)
    running: list[_Job] = field(default_factory=list)
    last_s: float = 0.0
    version: int = 0
    usage: PointUsage = field(default_factory=PointUsage)

    def advance(self, now: float) -> list[_Job]:
        """Progress every running generation to `now`; the ones that finished, removed."""
        dt = now - self.last_s
        if self.running and dt > 0:
            self.usage.busy_s += dt
            speed = self.model.speed(len(self.running))
            progress = dt * speed
            for job in self.running:
                if job.first_left > 0 and job.first_left <= progress + _EPS_S:
                    job.outcome.first_token_s = self.last_s + job.first_left / speed
                job.first_left -= progress
                job.left -= progress
        self.last_s = max(self.last_s, now)
        done = [j for j in self.running if j.left <= _EPS_S]
        if done:
            self.running = [j for j in self.running if j.left > _EPS_S]
        while self.waiting and len(self.running) < self.model.slots:
            self.running.append(self.waiting.popleft())
        return done

    def next_finish(self) -> float | None:
        if not self.running:
            return None
        return self.last_s + min(j.left for j in self.running) / self.model.speed(len(self.running))


def point_states(config: GrifoConfig, model: str) -> list[PointState]:
    """Healthy `PointState`s as the gateway builds them, each serving `model` when its engine
    does (a point reached by URL is taken to serve it)."""
    states = []
    for point in config.points:
        state = build_point_state(point, point.url or "http://127.0.0.1:1")
        served = model_id(point)
        if served is None or served == model:
            state.set_models({model: ModelCard(model, "chat", _context(point))})
        state.healthy, state.reason = True, "simulated"
        states.append(state)
    return states


def default_model_name(points: Sequence[PointConfig]) -> str:
    """The model most of the topology's points serve (ties: the first named)."""
    names = [m for m in (model_id(p) for p in points) if m is not None]
    if not names:
        return "fake-chat"
    return max(dict.fromkeys(names), key=names.count)


def simulate(
    config: GrifoConfig,
    requests: Sequence[TraceRequest],
    tenants: Mapping[int, str],
    senders: Mapping[str, Sender],
    strategy_name: str,
    models: Mapping[str, ServiceModel],
    *,
    model: str,
    gateway_ms: float = 1.0,
) -> SimResult:
    run = _Run(config, requests, tenants, senders, strategy_name, models, model, gateway_ms)
    return run.run()


class _Run:
    def __init__(
        self,
        config: GrifoConfig,
        requests: Sequence[TraceRequest],
        tenants: Mapping[int, str],
        senders: Mapping[str, Sender],
        strategy_name: str,
        models: Mapping[str, ServiceModel],
        model: str,
        gateway_ms: float,
    ) -> None:
        states = point_states(config, model)
        self.strategy = strategies.build(
            strategy_name, states, config.gateway.placement, dict(models)
        )
        self.points = {s.name: _Point(s, models[s.name], _context(s.config)) for s in states}
        self.requests = requests
        self.by_index = {r.index: r for r in requests}
        self.children: dict[int, list[int]] = {}
        for r in requests:
            if r.after is not None and r.after in self.by_index:
                self.children.setdefault(r.after, []).append(r.index)
        self.tenants, self.senders, self.model = tenants, senders, model
        self.gateway_s = gateway_ms / 1000
        self.interval_s = config.gateway.health_interval_s
        self.outcomes: dict[int, Outcome] = {}
        self.marks: dict[int, float] = {}
        self.heap: list[tuple[float, int, int, int | str, int]] = []
        self.seq = 0
        self.end = 0.0

    def push(self, t: float, kind: int, what: int | str, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, what, version))

    def run(self) -> SimResult:
        for r in self.requests:
            if r.after is None or r.after not in self.by_index:
                self.push(r.arrival_s, ARRIVE, r.index)
        self.push(0.0, POLL, 0)
        while self.heap:
            now, _, kind, what, version = heapq.heappop(self.heap)
            if kind == ARRIVE:
                self.arrive(int(what), now)
            elif kind == REACH:
                self.reach(self.outcomes[int(what)], now)
            elif kind == FINISH:
                point = self.points[str(what)]
                if version == point.version:
                    self.finished(point, point.advance(now), now)
                    self.reschedule(point)
            elif kind == ANSWER:
                self.answer(int(what), now)
            elif self.heap:  # POLL, while anything else is still to happen
                self.poll(now)
        arrivals = [o.arrival_s for o in self.outcomes.values()]
        return SimResult(
            self.strategy.name,
            [self.outcomes[r.index] for r in self.requests if r.index in self.outcomes],
            max(arrivals) - min(arrivals) if arrivals else 0.0,
            self.end,
            {name: p.usage for name, p in self.points.items()},
        )

    def refuse(self, index: int, now: float) -> None:
        r = self.by_index[index]
        self.outcomes[index] = Outcome(index, r.task, self.tenants[index], None, now)
        for child in self.children.get(index, ()):
            self.refuse(child, now)

    def arrive(self, index: int, now: float) -> None:
        r = self.by_index[index]
        sender = self.senders[self.tenants[index]]
        state = self.strategy.choose(self.model, sender, r.prompt_tokens, r.completion_tokens)
        if state is None:
            self.refuse(index, now)
            return
        out = Outcome(index, r.task, sender.tenant, state.name, now)
        out.prompt_tokens, out.completion_tokens = r.prompt_tokens, r.completion_tokens
        out.violation = sender.allowed is not None and state.jurisdiction not in sender.allowed
        context = self.points[state.name].context
        out.over_context = 0 < context < r.prompt_tokens + r.completion_tokens
        self.outcomes[index] = out
        state.gateway_in_flight += 1
        self.marks[index] = state.busy.enter(_ns(now))
        self.push(now + self.gateway_s + state.config.rtt_ms / 2000, REACH, index)

    def reach(self, out: Outcome, now: float) -> None:
        point = self.points[str(out.point)]
        self.finished(point, point.advance(now), now)
        work = point.model.work_s(out.prompt_tokens, out.completion_tokens)
        first = point.model.first_token_work_s(out.prompt_tokens)
        point.waiting.append(_Job(out, first, work))
        self.finished(point, point.advance(now), now)
        self.reschedule(point)

    def reschedule(self, point: _Point) -> None:
        point.version += 1
        when = point.next_finish()
        if when is not None:
            self.push(when, FINISH, point.state.name, point.version)

    def finished(self, point: _Point, jobs: list[_Job], now: float) -> None:
        half_rtt = point.state.config.rtt_ms / 2000
        for job in jobs:
            job.outcome.first_token_s += half_rtt
            point.usage.served += 1
            self.push(now + half_rtt, ANSWER, job.outcome.index)

    def answer(self, index: int, now: float) -> None:
        out = self.outcomes[index]
        state = self.points[str(out.point)].state
        state.gateway_in_flight -= 1
        busy_ns = state.busy.leave(self.marks.pop(index), _ns(now))
        out.done_s = self.end = now
        price = state.price(self.model)
        out.token_micros = token_cost_micros(price, out.prompt_tokens, out.completion_tokens)
        out.hardware_micros = hardware_cost_micros(state.usd_per_hour_micros, busy_ns)
        for child in self.children.get(index, ()):
            self.push(now, ARRIVE, child)

    def poll(self, now: float) -> None:
        """What the health poller writes: each point's own queue and running counts."""
        for point in self.points.values():
            point.state.point_queued = len(point.waiting)
            point.state.point_in_flight = len(point.running)
        self.push(now + self.interval_s, POLL, 0)


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _context(point: PointConfig) -> int:
    return point.engine.context_length if point.engine is not None else 0
