"""Two revisions of grifo side by side, for a change whose effect is a few percent: each
revision's gateway (the `overhead.py` setup, full pipeline, audit log on) takes turns under
load at c=64 (or `--connections N`) with the other (`turns.py`), alternating which goes
first. Per round, B's req/s, CPU per request, p50 and p99 latency over A's; the medians of
those ratios are the result (rounds are seconds apart, so a host whose speed drifts over
minutes moves both sides of a ratio together). At c=1 the p50 and p99 are the measures that
matter.

With `--streams N` the load is `compare.py`'s stream test instead of wrk: N concurrent
streams, each on a new connection (the mock point sends 22 events 5 ms apart), this process
the client on CPU 0; the measures are streams/s, CPU per stream and the time to the first
token's p50 and p99.

Usage: python bench/ab.py A [B] [--rounds 12] [--seconds 3] [--audit off] [--connections 64]
                          [--streams N] [--python-b PATH]

A and B are git revisions (checked out into temporary worktrees) or directories holding
`src/grifo`; B defaults to the working tree. Both run on this checkout's virtual environment,
or B on the interpreter `--python-b` names (a virtual environment holding grifo's
dependencies): `ab.py HEAD HEAD --python-b ...` compares two builds of Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from overhead import CONFIG
from turns import Variant, take_turns

ROOT = Path(__file__).resolve().parent.parent


def checkout(revision: str, into: Path) -> Path:
    """A directory holding `revision`'s `src/grifo`: itself, or a new worktree."""
    if (Path(revision) / "src" / "grifo").is_dir():
        return Path(revision).resolve()
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(into), revision],
        check=True,
        capture_output=True,
    )
    return into


@contextmanager
def checkouts(a: str, b: str, work: Path) -> Iterator[dict[str, Path]]:
    """Trees "A" and "B" for revisions `a` and `b` (see `checkout`); worktrees made for them
    under `work` are removed on the way out."""
    trees = {name: checkout(rev, work / f"tree-{name}") for name, rev in (("A", a), ("B", b))}
    try:
        yield trees
    finally:
        for name, tree in trees.items():
            if tree == work / f"tree-{name}":
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )


def add_revisions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a")
    parser.add_argument("b", nargs="?", default=str(ROOT), help="default: the working tree")


def main() -> None:
    parser = argparse.ArgumentParser()
    add_revisions(parser)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--audit", choices=["on", "off"], default="on")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=0, help="N concurrent streams, not wrk")
    parser.add_argument("--python-b", help="B's interpreter (default: this one)")
    args = parser.parse_args()
    if args.streams:
        os.sched_setaffinity(0, {0})  # the streaming client shares CPU 0 with the mock
    work = Path(tempfile.mkdtemp(prefix="grifo-ab-"))
    config = CONFIG
    if args.audit == "off":
        config = config.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    with checkouts(args.a, args.b, work) as trees:
        variants = [
            Variant(name, config, tree, args.python_b if name == "B" else None)
            for name, tree in trees.items()
        ]
        rates = take_turns(
            variants,
            work,
            args.rounds,
            args.seconds,
            connections=args.connections,
            streams=args.streams,
        )
    pairs = list(zip(rates["A"], rates["B"], strict=True))
    rps = statistics.median(b.rps / a.rps for a, b in pairs)
    cpu = statistics.median(b.cpu_ms / a.cpu_ms for a, b in pairs)
    p50 = statistics.median(b.p50_ms / a.p50_ms for a, b in pairs)
    p99 = statistics.median(b.p99_ms / a.p99_ms for a, b in pairs)
    load, unit, ttft = f"c={args.connections}", "request", ""
    if args.streams:
        load, unit, ttft = f"{args.streams} streams", "stream", "TTFT "
    print(
        f"| {args.rounds} rounds of {args.seconds} s at {load} | A {unit}s/s "
        f"| B {unit}s/s | B/A {unit}s/s | B/A CPU per {unit} | A {ttft}p50 ms "
        f"| B {ttft}p50 ms | B/A {ttft}p50 | A {ttft}p99 ms | B {ttft}p99 ms | B/A {ttft}p99 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| A {args.a}, B {'working tree' if args.b == str(ROOT) else args.b}"
        f"{f' on {args.python_b}' if args.python_b else ''} "
        f"| {statistics.median(r.rps for r in rates['A']):,.0f} "
        f"| {statistics.median(r.rps for r in rates['B']):,.0f} | x{rps:.3f} | x{cpu:.3f} "
        f"| {statistics.median(r.p50_ms for r in rates['A']):.3f} "
        f"| {statistics.median(r.p50_ms for r in rates['B']):.3f} | x{p50:.3f} "
        f"| {statistics.median(r.p99_ms for r in rates['A']):.3f} "
        f"| {statistics.median(r.p99_ms for r in rates['B']):.3f} | x{p99:.3f} |"
    )


if __name__ == "__main__":
    main()
