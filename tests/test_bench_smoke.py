"""The benchmarks that need no server still run against the current code (a renamed field
once broke `bench/placement.py` without any test noticing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_placement_benchmark_runs() -> None:
    spec = importlib.util.spec_from_file_location("placement_bench", BENCH / "placement.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.measure(100, 50) > 0  # median microseconds of 50 decisions over 100 points
