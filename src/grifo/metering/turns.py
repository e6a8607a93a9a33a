"""Awaitables for a loop turn, as bare generators: `asyncio.sleep(0)` without `sleep`'s own
coroutine around it.

Interpreted even in the compiled build (`make compiled`): a generator compiled by mypyc is not
awaitable from interpreted code, whatever its decorator says.
"""

from __future__ import annotations

import types
from collections.abc import Generator


@types.coroutine
def next_turn() -> Generator[None, None, None]:
    """Awaited, it lets the loop run one turn."""
    yield


@types.coroutine
def now() -> Generator[None, None, None]:
    """Awaited, it finishes at once."""
    yield from ()
