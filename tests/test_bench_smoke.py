"""The benchmarks still import and, those that need no server, run against the current code (a
renamed field once broke `bench/placement.py`, and a function moved between benchmark modules
broke `bench/audit.py`, without any test noticing)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    """A benchmark script as a module (its `main` not run)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_placement_benchmark_runs() -> None:
    module = _load("placement")
    assert module.measure(100, 50) > 0  # median microseconds of 50 decisions over 100 points


def test_the_shape_benchmark_runs() -> None:
    module = _load("shape")
    # Each side's CPU per request over two batches (its own asserts: every request finished).
    assert module.uvloop.run(module.coroutines(2)) > 0
    assert module.uvloop.run(module.callbacks(2)) > 0


_IMPORT_ALL = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports() -> None:
    # In a process of its own, from bench/ as the scripts run: they import each other by name.
    names = sorted(path.stem for path in BENCH.glob("*.py"))
    assert {"audit", "overhead", "pipeline"} <= set(names)
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, *names],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
