"""Two revisions of grifo side by side, for a change whose effect is a few percent: each
revision's gateway (the `overhead.py` setup, full pipeline, audit log on) takes turns under
load at c=64 with the other (`turns.py`), alternating which goes first. Per round, B's req/s
and CPU per request over A's; the medians of those ratios are the result (rounds are seconds
apart, so a host whose speed drifts over minutes moves both sides of a ratio together).

Usage: python bench/ab.py A [B] [--rounds 12] [--seconds 3] [--audit off]

A and B are git revisions (checked out into temporary worktrees) or directories holding
`src/grifo`; B defaults to the working tree. Both run on this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b", nargs="?", default=str(ROOT), help="default: the working tree")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--audit", choices=["on", "off"], default="on")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grifo-ab-"))
    config = CONFIG
    if args.audit == "off":
        config = config.replace("gateway: {", "gateway: {audit: {enabled: false}, ")
    trees = {
        name: checkout(rev, work / f"tree-{name}") for name, rev in (("A", args.a), ("B", args.b))
    }
    try:
        variants = [Variant(name, config, tree) for name, tree in trees.items()]
        rates = take_turns(variants, work, args.rounds, args.seconds)
    finally:
        for name, tree in trees.items():
            if tree == work / f"tree-{name}":
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )
    pairs = list(zip(rates["A"], rates["B"], strict=True))
    rps = statistics.median(b[0] / a[0] for a, b in pairs)
    cpu = statistics.median(b[1] / a[1] for a, b in pairs)
    print(
        f"| {args.rounds} rounds of {args.seconds} s | A req/s | B req/s | B/A req/s "
        "| B/A CPU per request |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| A {args.a}, B {'working tree' if args.b == str(ROOT) else args.b} "
        f"| {statistics.median(a for a, _ in rates['A']):,.0f} "
        f"| {statistics.median(b for b, _ in rates['B']):,.0f} | x{rps:.3f} | x{cpu:.3f} |"
    )


if __name__ == "__main__":
    main()
