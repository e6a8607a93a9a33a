"""A point's recent answer times: the hedge delay is a quantile of them."""

from __future__ import annotations

from collections import deque


class LatencyWindow:
    """The last `size` observations in seconds; quantiles are computed when asked (rarely: only
    for hedged requests) and cached until the next observation."""

    __slots__ = ("_cache", "_samples")

    def __init__(self, size: int = 256) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._cache: tuple[float, float] | None = None

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._cache = None

    def quantile(self, q: float) -> float:
        """The q-quantile (nearest rank) of the window; 0.0 when empty."""
        if not self._samples:
            return 0.0
        if self._cache is not None and self._cache[0] == q:
            return self._cache[1]
        ordered = sorted(self._samples)
        value = ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
        self._cache = (q, value)
        return value
