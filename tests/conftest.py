from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fabric import Fabric, topology_yaml
from tests.support.stores import pg_schema, redis_prefix

__all__ = ["pg_schema", "redis_prefix"]  # fixtures for every test module


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
