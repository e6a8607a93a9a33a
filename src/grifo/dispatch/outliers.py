"""Latency outliers: a point far slower than its peers is ejected, as a failing one is.

Errors and missed try timeouts eject a point from single requests; slowness needs peers to be
judged against. After each round of health checks, every healthy point with recent traffic is
compared with the others of its tier serving the same models: one whose recent time per output
token (the admission limit's short-term average, about its last 10 answers) exceeds
`ejection.latency_factor` × the median of the group is ejected. A group needs at least 3 points
with answers in the last `RECENT_S`; two points cannot say which one is slow.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

from grifo.admission.shedding import GradientLimit
from grifo.config.model import EjectionConfig
from grifo.topology import PointState

RECENT_S = 30.0
MIN_PEERS = 3


def eject_slow_points(
    points: Sequence[PointState],
    limits: Mapping[str, GradientLimit],
    ejection: EjectionConfig,
    now_s: float | None = None,
) -> list[PointState]:
    """Eject the latency outliers among `points`; returns the ones ejected now."""
    factor = ejection.latency_factor
    if factor is None:
        return []
    now = time.monotonic() if now_s is None else now_s
    groups: dict[tuple[str, frozenset[str]], list[tuple[PointState, float]]] = defaultdict(list)
    for point in points:
        limit = limits.get(point.name)
        if not point.healthy or limit is None or limit.recent_s is None:
            continue
        if now - limit.sampled_at > RECENT_S:
            continue
        groups[point.config.tier, frozenset(point.models)].append((point, limit.recent_s))
    ejected = []
    for members in groups.values():
        if len(members) < MIN_PEERS:
            continue
        median = statistics.median(s for _, s in members)
        for point, recent in members:
            if recent > factor * median:
                point.eject(
                    now,
                    ejection,
                    f"{recent * 1000:.1f} ms per token, over {factor:g}x its peers' median "
                    f"{median * 1000:.1f} ms",
                )
                ejected.append(point)
    return ejected
