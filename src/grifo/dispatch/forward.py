"""Send a request to ranked candidates, moving on only while the client has received nothing.

Every candidate was already filtered by jurisdiction, so neither a retry nor a hedge can leave
the allowed set. A point whose answer claims a different jurisdiction than configured is not
trusted. An attempt is *committed* once it is safe to start answering the client: a whole
answer was read, or a stream produced its first token (see `first_token.py`). Before that, a
refused connection, a 5xx, a broken or silent point (`dispatch.try_timeout_s`) moves the request
to the next candidate; retries and hedges share one budget (Envoy's: 20% of requests being
dispatched, at least 3) so a failing region cannot multiply the load on the points left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grifo.config.model import DispatchConfig, EjectionConfig
from grifo.errors import (
    GrifoError,
    NoCompliantPointError,
    PointProtocolError,
    PointTimeoutError,
    PointUnavailableError,
)
from grifo.http.message import Headers
from grifo.http.upstream import UpstreamResponse
from grifo.placement.scoring import Candidate
from grifo.telemetry.tracing import Tracing
from grifo.topology import PointState

from .first_token import await_first_token
from .pools import PointPools as PointPools  # where it was, for its importers

log = logging.getLogger("grifo.dispatch")

_FINAL, _BUDGETED, _FREE = 0, 1, 2  # may the request move on after this attempt, and how


class RetryBudget:
    """Envoy's retry budget: retries in progress stay under max(min_concurrent, ratio x requests
    being forwarded), so a failing region cannot multiply the load on the points left."""

    def __init__(self, ratio: float = 0.2, min_concurrent: int = 3) -> None:
        self._ratio = ratio
        self._min = min_concurrent
        self.active = 0
        self.retrying = 0

    def acquire(self) -> bool:
        if self.retrying >= max(self._min, self._ratio * self.active):
            return False
        self.retrying += 1
        return True


@dataclass(slots=True)
class Plan:
    """How one request is dispatched."""

    stream: bool
    deadline: float  # monotonic seconds: the request's own
    blame_timeouts: bool = True  # False when the deadline is the client's, not the point's fault
    hedge: bool = False
    measured: bool = True
    """False when the time to commit is not the point's alone (an agent run's first step
    includes the model's whole step): no `try_timeout_s`, and no latency sample for hedging."""
    span: Any = None  # the dispatch span, when tracing is on: each attempt is its child


@dataclass(slots=True)
class Answer:
    """The committed attempt: when done with it, give the busy-clock mark back with
    `point.busy.leave` and take the request off `point.gateway_in_flight`."""

    point: PointState
    response: UpstreamResponse
    busy_mark: float
    payload: bytes | None  # the whole body, unless a stream answered 200
    tried: list[tuple[PointState, str]] = field(default_factory=list)  # other attempts, outcome


@dataclass(slots=True)
class _Try:
    point: PointState
    mark: float
    started: float
    response: UpstreamResponse | None = None
    payload: bytes | None = None
    error: GrifoError | None = None
    outcome: str = "ok"
    move_on: int = _FINAL


class Counts:
    """What dispatch did, for metrics: retries by reason, hedges by outcome."""

    def __init__(self) -> None:
        self.retries: dict[str, int] = {}
        self.hedges: dict[str, int] = {"sent": 0, "won": 0, "lost": 0, "denied": 0}

    def retry(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1


class Dispatcher:
    def __init__(
        self,
        pools: PointPools,
        config: DispatchConfig,
        ejection: EjectionConfig,
        tracing: Tracing | None = None,
    ) -> None:
        self.pools = pools
        self.tracing = tracing
        self.config = config
        self.ejection = ejection
        self.budget = RetryBudget(config.retry_ratio, config.retry_min)
        self.counts = Counts()

    async def forward(
        self, candidates: Sequence[Candidate], request: tuple[str, bytes, Headers], plan: Plan
    ) -> Answer:
        """The first candidate that commits; raises the last failure when none can."""
        self.budget.active += 1
        held: list[int] = [0]  # retries and hedges this request holds in the budget
        try:
            if plan.hedge and len(candidates) > 1:
                return await self._hedged(candidates, request, plan, held)
            tried: list[tuple[PointState, str]] = []
            last: _Try | None = None
            for i, candidate in enumerate(candidates):
                last = await self._try(candidate.point, request, plan)
                more = i + 1 < len(candidates)
                if last.move_on == _FINAL or not more or not self._may_move_on(last, held):
                    break
                tried.append((last.point, last.outcome))
            return _settle(last, tried)
        finally:
            self.budget.active -= 1
            self.budget.retrying -= held[0]

    async def _hedged(
        self,
        candidates: Sequence[Candidate],
        request: tuple[str, bytes, Headers],
        plan: Plan,
        held: list[int],
    ) -> Answer:
        """Start on the first candidate; if it has not committed after its observed p95, send a
        copy to the next one and take whichever commits first. Failures move on as in turn."""
        race = _Race(self, list(candidates), request, plan, held)
        race.launch()
        hedge_at = time.monotonic() + self._hedge_delay_s(candidates[0].point, plan.stream)
        try:
            while race.tasks:
                wait_s = None
                if not race.hedged and race.queue:
                    wait_s = max(0.0, hedge_at - time.monotonic())
                done, _ = await asyncio.wait(
                    race.tasks, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    race.hedge()
                for task in done:
                    if (answer := race.finished(task)) is not None:
                        return answer
            return _settle(race.fallback, race.tried)
        finally:
            for task in race.tasks:
                task.cancel()
            if race.tasks:
                await asyncio.gather(*race.tasks, return_exceptions=True)

    def _may_move_on(self, attempt: _Try, held: list[int]) -> bool:
        """Whether a failed attempt may be followed by another (retries draw on the budget)."""
        if attempt.move_on == _BUDGETED:
            if not self.budget.acquire():
                return False
            held[0] += 1
        self.counts.retry(attempt.outcome)
        log.warning(
            "point %s: %s, trying the next compliant one", attempt.point.name, attempt.outcome
        )
        _release(attempt)
        return True

    def _hedge_delay_s(self, point: PointState, stream: bool) -> float:
        window = point.first_token_s if stream else point.answer_s
        if len(window) < 20:
            delay_ms = self.config.hedge_initial_delay_ms
        else:
            delay_ms = window.quantile(self.config.hedge_quantile) * 1000
        return max(delay_ms, self.config.hedge_min_delay_ms) / 1000

    async def _try(
        self, point: PointState, request: tuple[str, bytes, Headers], plan: Plan
    ) -> _Try:
        """One attempt at one point, judged: never raises but for cancellation."""
        attempt = _Try(point, point.busy.enter(time.monotonic_ns()), time.monotonic())
        point.gateway_in_flight += 1  # placement sees requests still waiting for an answer
        span = None
        if plan.span is not None and self.tracing is not None:
            span = self.tracing.child(
                plan.span,
                f"attempt {point.name}",
                {"grifo.point": point.name, "grifo.jurisdiction": point.jurisdiction},
            )
            path, body, headers = request
            request = (path, body, [*headers, (b"traceparent", self.tracing.traceparent(span))])
        try:
            await self._commit(attempt, request, plan)
        except asyncio.CancelledError:
            _release(attempt)
            if span is not None:
                span.set_attribute("grifo.outcome", "cancelled")
                span.end()
            raise
        except PointUnavailableError as exc:  # nothing was answered: the point is down
            point.mark_down(str(exc))
            _failed(attempt, exc, "unavailable", _FREE)
        except (TimeoutError, PointTimeoutError):
            if time.monotonic() < plan.deadline - 0.001:
                point.failed(time.monotonic(), self.ejection)  # it missed try_timeout_s
                _failed(attempt, PointTimeoutError(_late(self.config)), "timeout", _BUDGETED)
            else:  # the request's own deadline: the caller decides whose fault that was
                if plan.blame_timeouts:
                    point.failed(time.monotonic(), self.ejection)
                _failed(
                    attempt,
                    PointTimeoutError("the point did not answer in time"),
                    "deadline",
                    _FINAL,
                )
        except GrifoError as exc:  # a broken answer, or one from the wrong jurisdiction
            point.failed(time.monotonic(), self.ejection)
            _failed(attempt, exc, "broken", _BUDGETED)
        else:
            self._judge(attempt, plan)
        if span is not None:
            span.set_attribute("grifo.outcome", attempt.outcome)
            span.end()
        return attempt

    def _judge(self, attempt: _Try, plan: Plan) -> None:
        """An answer came: a 5xx counts against the point; a good one's time is a sample."""
        point, response = attempt.point, attempt.response
        assert response is not None
        if response.status >= 500:
            point.failed(time.monotonic(), self.ejection)
            attempt.outcome, attempt.move_on = str(response.status), _BUDGETED
        elif plan.measured:
            window = point.first_token_s if attempt.payload is None else point.answer_s
            window.add(time.monotonic() - attempt.started)

    async def _commit(self, attempt: _Try, request: tuple[str, bytes, Headers], plan: Plan) -> None:
        """Send, and read until the answer may be committed to the client."""
        path, body, headers = request
        point = attempt.point
        until = plan.deadline
        if self.config.try_timeout_s is not None and plan.measured:
            until = min(until, attempt.started + self.config.try_timeout_s)
        response = await self.pools[point.name].request(
            "POST", path, headers=headers, body=body, head_timeout_s=until - time.monotonic()
        )
        attempt.response = response
        claimed = response.headers.get(b"x-grifo-jurisdiction", b"").decode("latin-1")
        if claimed != point.jurisdiction:
            point.mark_down(f"reports jurisdiction {claimed!r}, configured {point.jurisdiction}")
            raise PointProtocolError("the point's answer did not match its configured jurisdiction")
        stream = plan.stream and response.status == 200
        if response.complete and not stream:  # the usual whole answer: body came with head
            attempt.payload = response.take_body()
            return
        timer = asyncio.get_running_loop().call_later(
            until - time.monotonic(), response.fail, TimeoutError()
        )
        try:
            if stream:
                await await_first_token(response)
            else:
                attempt.payload = await response.read()
        finally:
            timer.cancel()


class _Race:
    """One hedged request: the attempts in flight and what became of the others."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        queue: list[Candidate],
        request: tuple[str, bytes, Headers],
        plan: Plan,
        held: list[int],
    ) -> None:
        self.dispatcher = dispatcher
        self.queue = queue
        self.request = request
        self.plan = plan
        self.held = held
        self.tasks: dict[asyncio.Task[_Try], tuple[int, PointState]] = {}  # -> order, point
        self.tried: list[tuple[PointState, str]] = []
        self.launched = 0
        self.hedged = False
        self.fallback: _Try | None = None  # a failure that could not move on

    def launch(self) -> None:
        point = self.queue.pop(0).point
        task = asyncio.ensure_future(self.dispatcher._try(point, self.request, self.plan))
        self.tasks[task] = (self.launched, point)
        self.launched += 1

    def hedge(self) -> None:
        """The first attempt is late: send a copy to the next candidate, if the budget allows."""
        self.hedged = True
        counts = self.dispatcher.counts.hedges
        if self.dispatcher.budget.acquire():
            self.held[0] += 1
            counts["sent"] += 1
            self.launch()
        else:
            counts["denied"] += 1

    def finished(self, task: asyncio.Task[_Try]) -> Answer | None:
        """The answer if this attempt committed; else move on or keep it as the fallback."""
        order, _ = self.tasks.pop(task)
        attempt = task.result()
        if attempt.move_on == _FINAL and attempt.error is None:
            if self.hedged and self.tasks:
                self.dispatcher.counts.hedges["won" if order > 0 else "lost"] += 1
            if self.fallback is not None:
                _release(self.fallback)
            self.tried += [(point, "hedge-lost") for _, point in self.tasks.values()]
            return _settle(attempt, self.tried)
        moving = attempt.move_on != _FINAL and bool(self.queue)
        if moving and self.dispatcher._may_move_on(attempt, self.held):
            self.tried.append((attempt.point, attempt.outcome))
            self.launch()
            return None
        if self.fallback is not None:
            self.tried.append((self.fallback.point, self.fallback.outcome))
            _release(self.fallback)
        self.fallback = attempt
        return None


def _failed(attempt: _Try, error: GrifoError, outcome: str, move_on: int) -> None:
    attempt.error, attempt.outcome, attempt.move_on = error, outcome, move_on
    if attempt.response is not None:
        attempt.response.close()


def _release(attempt: _Try) -> None:
    """An attempt that will not be answered from: close it and stop its busy clock."""
    if attempt.response is not None:
        attempt.response.close()
    attempt.point.busy.leave(attempt.mark, time.monotonic_ns())
    attempt.point.left()


def _settle(last: _Try | None, tried: list[tuple[PointState, str]]) -> Answer:
    """The answer to commit, or the failure to raise."""
    if last is None:
        raise NoCompliantPointError("no compliant point could be tried")
    if last.error is None and last.response is not None:
        return Answer(last.point, last.response, last.mark, last.payload, tried)
    _release(last)
    if last.error is not None and last.move_on == _FINAL:
        raise last.error
    if isinstance(last.error, PointUnavailableError):
        raise NoCompliantPointError(
            "every compliant point refused the request; it was not sent anywhere else"
        )
    raise last.error or NoCompliantPointError("no compliant point answered")


def _late(config: DispatchConfig) -> str:
    return f"the point did not answer within {config.try_timeout_s:g} s (dispatch.try_timeout_s)"
