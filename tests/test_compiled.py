"""The modules `make compiled` builds with mypyc (pyproject.toml, [tool.grifo] compiled).

`make test` runs the whole suite twice: on the interpreted modules, then with the compiled
build first on the path (`make pytest-compiled`, GRIFO_COMPILED=1). These tests keep the list
honest in both runs, and in the second make sure the suite really ran the compiled modules.
"""

from __future__ import annotations

import ast
import importlib
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPILED: list[str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["grifo"][
    "compiled"
]


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def test_every_listed_module_exists_once() -> None:
    assert COMPILED, "nothing listed"
    assert len(set(COMPILED)) == len(COMPILED)
    for path in COMPILED:
        assert (ROOT / "src" / path).is_file(), path


@pytest.mark.parametrize("path", COMPILED)
def test_no_listed_module_raises_from(path: str) -> None:
    """mypyc ignores `raise ... from ...`: the cause would be lost in the compiled build
    (`grifo.errors.caused_by` says it in a way both builds keep)."""
    tree = ast.parse((ROOT / "src" / path).read_text())
    chained = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.cause]
    assert chained == [], f"{path}: `raise ... from` on lines {chained}; use caused_by"


@pytest.mark.parametrize("path", COMPILED)
def test_no_listed_module_defines_msgspec_structs(path: str) -> None:
    """msgspec reads the field types of a compiled module's Structs wrongly (a usage object
    decoded as absent): Structs live in interpreted modules."""
    module = importlib.import_module(_module(path))
    import msgspec

    structs = [
        name
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, msgspec.Struct)
        and value.__module__ == module.__name__
    ]
    assert structs == [], f"{path} defines {structs}"


@pytest.mark.parametrize("path", COMPILED)
def test_no_listed_module_defines_generator_coroutines(path: str) -> None:
    """A generator compiled by mypyc cannot be awaited from interpreted code, `types.coroutine`
    or not (`grifo/metering/turns.py` holds them, interpreted)."""
    tree = ast.parse((ROOT / "src" / path).read_text())
    decorated = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any(ast.unparse(d).endswith("coroutine") for d in node.decorator_list)
    ]
    assert decorated == [], f"{path}: {decorated}"


@pytest.mark.skipif(
    os.environ.get("GRIFO_COMPILED") != "1", reason="in the compiled run (make pytest-compiled)"
)
@pytest.mark.parametrize("path", COMPILED)
def test_the_compiled_run_imports_the_compiled_module(path: str) -> None:
    module = importlib.import_module(_module(path))
    assert module.__file__ is not None
    assert module.__file__.endswith(".so"), f"{module.__name__} came from {module.__file__}"


def test_a_cause_given_with_caused_by_is_kept() -> None:
    """What `raise ... from exc` and `from None` set (tests/test_http.py checks a compiled
    client's TLS failure keeps its cause, in the compiled run)."""
    from grifo.errors import PointUnavailableError, caused_by

    def failing(cause: bool) -> None:
        try:
            raise OSError("refused")
        except OSError as exc:
            raise caused_by(PointUnavailableError("cannot connect"), exc if cause else None)  # noqa: B904

    with pytest.raises(PointUnavailableError) as caught:
        failing(cause=True)
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__suppress_context__
    with pytest.raises(PointUnavailableError) as caught:
        failing(cause=False)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
