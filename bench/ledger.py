"""Ledger throughput: entries per second committed by the gateway's `LedgerWriter` (spool +
group commit in a writer thread) on SQLite and PostgreSQL, beside a baseline that commits each
entry in its own transaction, as a naive writer would. Runs each 3 times; reports medians.

`--paced RATE` measures instead what the writer thread costs at a steady arrival rate (as
under a gateway's load, where entries come a few at a time rather than all at once): entries
recorded every millisecond for `--seconds`, the writer thread's CPU time (user + system, from
/proc) per entry, for each of several gathering waits (`--waits-ms`, the time the thread lets
entries gather after the first of a batch), SQLite, 3 rounds each, medians.

Usage: python bench/ledger.py [--entries 50000] [--postgres postgresql://postgres@127.0.0.1/test]
       python bench/ledger.py --paced 6000 [--seconds 5] [--waits-ms 5,50]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from grifo.store.ledger import LedgerSink, LedgerWriter, RecordWriter
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


def paced_cpu_us(db: StateDB, spool: Path, rate: int, seconds: float, wait_s: float) -> float:
    """The writer thread's CPU microseconds per entry, entries arriving at `rate` per second."""
    writer = RecordWriter(db.open_ledger, spool, LedgerEntry, "ledger", max_wait_s=wait_s)
    stat = Path(f"/proc/self/task/{writer._worker.native_id}/stat")
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    batch = entries(int(rate * seconds), f"p{wait_s}")
    per_ms = max(1, rate // 1000)
    started_cpu, started = cpu_s(), time.perf_counter()
    for i in range(0, len(batch), per_ms):
        for entry in batch[i : i + per_ms]:
            writer.record(entry)
        pause = started + (i + per_ms) / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    while writer.written < len(batch):
        time.sleep(0.001)
    used = cpu_s() - started_cpu
    writer.close()
    return used / len(batch) * 1e6


def paced(rate: int, seconds: float, waits_ms: list[float], tmp: Path) -> None:
    results: dict[float, list[float]] = {wait: [] for wait in waits_ms}
    for round_ in range(3):
        for wait in waits_ms:
            db = StateDB(tmp / f"paced-{round_}-{wait}.db")
            spool = tmp / f"paced-{round_}-{wait}"
            results[wait].append(paced_cpu_us(db, spool, rate, seconds, wait / 1000))
            db.close()
    for wait, cpu in results.items():
        rounds = ", ".join(f"{c:.2f}" for c in cpu)
        median = statistics.median(cpu)
        print(f"sqlite, {rate:,} entries/s, gathering {wait:g} ms: writer thread {median:.2f} us "
              f"CPU per entry ({rounds})")  # fmt: skip


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
    parser.add_argument("--paced", type=int, metavar="RATE", help="entries/s: writer CPU")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--waits-ms", default="5,50", help="gathering waits to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.paced:
            waits = [float(w) for w in args.waits_ms.split(",")]
            paced(args.paced, args.seconds, waits, tmp)
            return
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
