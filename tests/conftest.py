from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.support.fabric import Fabric, topology_yaml
from tests.support.stores import pg_schema, redis_prefix

__all__ = ["pg_schema", "redis_prefix"]  # fixtures for every test module

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Points started by tests (in this process or as subprocesses) keep what they remember,
    like measured engine thread counts, in a directory of the test session's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRIFO_CACHE_DIR", str(tmp_path_factory.mktemp("grifo-cache")))
        yield


@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """`grifo.cli.main` run in-process points the root logger at the sys.stderr of that
    moment, pytest's capture, which is closed after the test: later tests' warnings would
    each print a logging error instead. Restore the root logger after every test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test's coroutine (at most 10 s) once on asyncio's loop and once on uvloop's,
    the loop `grifo serve` uses."""

    def runner(coro: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(asyncio.wait_for(coro, timeout=10))
        else:
            asyncio.run(asyncio.wait_for(coro, timeout=10))

    return runner


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    """Three fake-engine points in real processes behind one gateway, shared by a module."""
    fab = Fabric.from_yaml(topology_yaml(), tmp_path_factory.mktemp("fabric"))
    yield fab
    fab.close()


@pytest.fixture
def fresh_fabric(tmp_path: Path) -> Iterator[Fabric]:
    """A fabric of its own, for tests that stop points."""
    fab = Fabric.from_yaml(topology_yaml(), tmp_path)
    yield fab
    fab.close()
