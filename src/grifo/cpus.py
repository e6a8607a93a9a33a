"""How many CPUs this process may use: the CPUs its affinity allows, capped by the CPU quota of
its control group (a container started with `--cpus 2` on a 16-core host may run on all 16
cores, but gets two cores' worth of time). Used for `grifo serve --workers auto` and an
engine's `threads: auto`.

Quotas are read from cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` over `cpu.cfs_period_us`),
in the process's own group and each group above it up to the mount point: the tightest limit
holds. A quota of 1.5 CPUs counts as 2 (the process can use more than one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: its affinity's count, capped by its cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root, membership)
    if quota is not None and quota < cpus:
        cpus = quota
    return cpus if cpus > 1 else 1


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPU quota of the process's control group in whole CPUs (rounded up), or None when
    there is none or it cannot be read."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: "0::/path"
            limits += _walk(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            limits += _walk(root / "cpu", path, _v1_limit)
    return math.ceil(min(limits)) if limits else None


def _walk(mount: Path, path: str, limit: Callable[[Path], float | None]) -> list[float]:
    """The limits found in the group at `path` under `mount` and in each group above it."""
    found: list[float] = []
    group = mount / path.strip("/")
    while True:
        value = limit(group)
        if value is not None:
            found.append(value)
        if group == mount or mount not in group.parents:
            return found
        group = group.parent


def _v2_limit(group: Path) -> float | None:
    try:
        quota, period = (group / "cpu.max").read_text().split()
        if quota == "max":
            return None
        return _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_limit(group: Path) -> float | None:
    try:
        quota = int((group / "cpu.cfs_quota_us").read_text())
        period = int((group / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None  # v1 says -1 for no quota
