"""Sharing a point's hardware hour among the requests it serves at the same time.

While n requests are in flight at a point, each pays 1/n of the elapsed time (processor
sharing). The clock keeps S(t) = ∫ dt / n(t) over the time the point was busy; a request's share
is S(end) − S(start), so it costs O(1) per arrival and departure. Worked example: A runs 0–3 s
and B 1–2 s on a point; A pays 1 + 0.5 + 1 = 2.5 s and B 0.5 s, together the 3 s the point was
busy. Idle time is billed to nobody.
"""

from __future__ import annotations


class BusyClock:
    def __init__(self) -> None:
        self._n = 0
        self._last_ns = 0
        self._shared_ns = 0.0  # S(t): fits a float exactly enough for centuries of nanoseconds

    def _advance(self, now_ns: int) -> None:
        if now_ns > self._last_ns:
            if self._n > 0:
                self._shared_ns += (now_ns - self._last_ns) / self._n
            self._last_ns = now_ns

    def enter(self, now_ns: int) -> float:
        """A request starts; returns the mark to give back to `leave`."""
        self._advance(now_ns)
        self._n += 1
        return self._shared_ns

    def leave(self, mark: float, now_ns: int) -> int:
        """A request ends; returns its share of the busy time, in ns."""
        self._advance(now_ns)
        if self._n > 0:
            self._n -= 1
        return round(self._shared_ns - mark)

    @property
    def in_flight(self) -> int:
        return self._n
