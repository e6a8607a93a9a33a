"""A fake clock for code that takes one (`clock: Callable[[], float]`)."""

from __future__ import annotations


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
