"""Which slot of a batching engine a new request takes.

Slots are llama.cpp sequence ids, each with its own cache stream, and llama.cpp computes the
sequences of one batch together only in runs of consecutive ids: every choice here keeps the
running slots one run where it can, after reusing a cached prefix, which saves computing it.
"""

from __future__ import annotations

from collections.abc import Sequence

_MIN_REUSE = 16


def beside(
    slot: int, free: Sequence[int], last_used: Sequence[int], running: set[int]
) -> int | None:
    """Where to copy a reused prefix from `slot` so that running slots stay one run of
    consecutive ids: None if `slot` is beside a running one already (or nothing runs, or no
    free slot is beside one); else the free slot with the most running neighbours, the least
    recently used among equals."""
    if not running or slot - 1 in running or slot + 1 in running:
        return None
    best, key = None, (0, 0)
    for other, used in zip(free, last_used, strict=True):
        neighbours = (other - 1 in running) + (other + 1 in running)
        if neighbours and (neighbours, -used) > key:
            best, key = other, (neighbours, -used)
    return best


def choose_slot(
    free: Sequence[int], shared: Sequence[int], last_used: Sequence[int], running: set[int]
) -> tuple[int, int]:
    """(slot, tokens to reuse) for a new request, from the free slots with the prefix each
    shares with its prompt and when each was last used, and the slots of running sequences.

    The slot sharing the longest prefix, if at least `_MIN_REUSE` tokens (a few common tokens,
    like the BOS, are not worth evicting another conversation for). Otherwise a slot next to
    running ones, so that running slots stay one run of consecutive ids (llama.cpp batches only
    those together): one between two running slots first, then one beside a running slot. Ties
    go to the least recently used slot, whose cached prefix is the least likely to be asked
    for again.
    """
    best, key = free[0], (-1, -1, 0)
    for slot, common, used in zip(free, shared, last_used, strict=True):
        common = common if common >= _MIN_REUSE else 0
        neighbours = (slot - 1 in running) + (slot + 1 in running)
        candidate = (common, neighbours, -used)
        if candidate > key:
            best, key = slot, candidate
    return best, key[0]


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists (binary search over C-speed slice
    comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
