"""Answers wait one turn of the event loop for the turn's other requests, and only then."""

from __future__ import annotations

import asyncio

from grifo.metering.answer import Answering
from tests.conftest import Runner


def _answering(serving: int) -> Answering:
    answers = Answering.__new__(Answering)  # catch_up reads nothing but the count
    answers.serving = serving
    return answers


async def _order(serving: int) -> list[str]:
    """What ran before the awaiting request went on: a callback ready now ("turn 1") and
    the one it schedules ("turn 2")."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    def first() -> None:
        seen.append("turn 1")
        loop.call_soon(seen.append, "turn 2")

    loop.call_soon(first)
    await _answering(serving).catch_up()
    seen.append("went on")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return seen


def test_a_request_among_others_waits_exactly_one_loop_turn(run: Runner) -> None:
    async def check() -> None:
        assert await _order(serving=5) == ["turn 1", "went on", "turn 2"]

    run(check())


def test_a_lone_request_does_not_wait(run: Runner) -> None:
    async def check() -> None:
        assert await _order(serving=1) == ["went on", "turn 1", "turn 2"]

    run(check())
