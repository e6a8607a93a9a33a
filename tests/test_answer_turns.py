"""Answers wait one turn of the event loop for the turn's other requests, and only then."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from grifo.config.model import GatewayConfig
from grifo.metering.answer import Answering
from grifo.store.ledger import LedgerWriter
from grifo.store.sqlite import StateDB
from grifo.telemetry.metrics import GatewayMetrics
from tests.conftest import Runner


@pytest.fixture
def answers(tmp_path: Path) -> Iterator[Answering]:
    ledger = LedgerWriter(StateDB(tmp_path / "grifo.db").open_ledger, tmp_path / "spool")
    yield Answering(GatewayConfig(), ledger, GatewayMetrics(), None, None, None)
    ledger.close()


async def _order(answers: Answering, serving: int) -> list[str]:
    """What ran before the awaiting request went on: a callback ready now ("turn 1") and
    the one it schedules ("turn 2")."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []

    def first() -> None:
        seen.append("turn 1")
        loop.call_soon(seen.append, "turn 2")

    loop.call_soon(first)
    answers.serving = serving  # catch_up reads nothing but the count
    await answers.catch_up()
    seen.append("went on")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return seen


def test_a_request_among_others_waits_exactly_one_loop_turn(
    run: Runner, answers: Answering
) -> None:
    async def check() -> None:
        assert await _order(answers, serving=5) == ["turn 1", "went on", "turn 2"]

    run(check())


def test_a_lone_request_does_not_wait(run: Runner, answers: Answering) -> None:
    async def check() -> None:
        assert await _order(answers, serving=1) == ["went on", "turn 1", "turn 2"]

    run(check())
