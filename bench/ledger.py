"""Ledger throughput: entries per second committed by the gateway's `LedgerWriter` (spool +
group commit in a writer thread) on SQLite and PostgreSQL, beside a baseline that commits each
entry in its own transaction, as a naive writer would. Runs each 3 times; reports medians.

Usage: python bench/ledger.py [--entries 50000] [--postgres postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from grifo.store.ledger import LedgerSink, LedgerWriter
from grifo.store.postgres import PostgresDB
from grifo.store.records import LedgerEntry
from grifo.store.sqlite import StateDB


def entries(n: int, tag: str) -> list[LedgerEntry]:
    now = int(time.time() * 1000)
    row = ("/v1/chat/completions", "smollm2-135m-instruct", "lima-edge", "PE", 40, 120, 37)
    return [
        LedgerEntry(f"req-{tag}-{i}", now, f"t-{i % 50}", f"k-{i % 200}", *row, "ok", "point", 12.5)
        for i in range(n)
    ]


def writer_rate(connect: Callable[[], LedgerSink], spool: Path, batch: list[LedgerEntry]) -> float:
    """Entries/s from the first `record` until the writer has committed them all."""
    writer = LedgerWriter(connect, spool)
    started = time.perf_counter()
    for entry in batch:
        writer.record(entry)
    while writer.written < len(batch):
        time.sleep(0.001)
    elapsed = time.perf_counter() - started
    writer.close()
    return len(batch) / elapsed


def baseline_rate(sink: LedgerSink, batch: list[LedgerEntry]) -> float:
    """Entries/s writing each entry in its own transaction."""
    started = time.perf_counter()
    for entry in batch:
        sink.write_entries([entry])
    return len(batch) / (time.perf_counter() - started)


def run(name: str, open_db: Callable[[], StateDB | PostgresDB], n: int, tmp: Path) -> None:
    grouped, single = [], []
    for round_ in range(3):
        db = open_db()
        spool = tmp / f"{name}-{round_}"
        grouped.append(writer_rate(db.open_ledger, spool, entries(n, f"g{round_}")))
        sink = db.open_ledger()
        single.append(baseline_rate(sink, entries(max(n // 10, 100), f"s{round_}")))
        sink.close()
        db.close()
    g, s = statistics.median(grouped), statistics.median(single)
    print(f"{name:<10} group commit {g:>10,.0f} entries/s   one per transaction {s:>9,.0f}/s   "
          f"ratio {g / s:5.1f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        counter = iter(range(100))
        run("sqlite", lambda: StateDB(tmp / f"grifo-{next(counter)}.db"), args.entries, tmp)
        schema = f"grifo_bench_{secrets.token_hex(4)}"
        try:
            run("postgres", lambda: PostgresDB(args.postgres, schema), args.entries, tmp)
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as conn:
                drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                conn.execute(drop)


if __name__ == "__main__":
    main()
