"""Read request traces: Mooncake JSON lines and the Azure LLM inference CSVs.

Mooncake (`*.jsonl`): `timestamp` (ms from start), `input_length`, `output_length`, `hash_ids`
(one id per 512-token block of the prompt; equal ids mean an equal prefix). Azure (`*.csv`):
`TIMESTAMP,ContextTokens,GeneratedTokens`, arrival as a date and time.

Multi-step tasks. A request may depend on an earlier one: it is sent the moment that one's
answer arrives (its own timestamp is then ignored), as an agent's next step or a chat's next
turn would be. With `agent_steps=None` a Mooncake trace's conversations are the tasks: a
request's parent is the latest earlier request whose full prompt blocks (all its `hash_ids` but
the last, partial, block; at least two) begin this request's `hash_ids` and whose prompt is
shorter, i.e. the previous turn, whose prompt and answer this turn's prompt repeats. Azure
requests are independent. With `agent_steps=N` consecutive runs of N requests (in arrival
order) form the tasks, whatever the format; N=1 makes every request independent.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int
    arrival_s: float  # scaled by the replay speed; only used when `after` is None
    prompt_tokens: int
    completion_tokens: int
    after: int | None = None  # the request whose answer this one waits for
    task: int = -1  # index of the task's first request


@dataclass(frozen=True, slots=True)
class _Raw:
    arrival_s: float
    prompt: int
    completion: int
    blocks: tuple[int, ...] = ()


def load_trace(
    path: Path,
    *,
    limit: int | None = None,
    speed: float = 1.0,
    token_scale: float = 1.0,
    agent_steps: int | None = None,
) -> list[TraceRequest]:
    """The first `limit` requests of a trace, arrivals divided by `speed` (relative to the
    first), token counts multiplied by `token_scale` (at least one token each)."""
    if speed <= 0 or token_scale <= 0:
        raise TraceError("speed and token scale must be positive")
    if agent_steps is not None and agent_steps < 1:
        raise TraceError("agent steps must be at least 1")
    rows = list(islice(_read(path), limit))
    if not rows:
        raise TraceError(f"{path}: no requests")
    start = min(r.arrival_s for r in rows)
    if agent_steps is not None:
        parents: list[int | None] = [
            None if i % agent_steps == 0 else i - 1 for i in range(len(rows))
        ]
    else:
        parents = conversation_parents([r.blocks for r in rows], [r.prompt for r in rows])
    tasks: list[int] = []
    for i, parent in enumerate(parents):
        tasks.append(i if parent is None else tasks[parent])
    return [
        TraceRequest(
            index=i,
            arrival_s=(r.arrival_s - start) / speed,
            prompt_tokens=max(1, round(r.prompt * token_scale)),
            completion_tokens=max(1, round(r.completion * token_scale)),
            after=parents[i],
            task=tasks[i],
        )
        for i, r in enumerate(rows)
    ]


def conversation_parents(blocks: list[tuple[int, ...]], prompts: list[int]) -> list[int | None]:
    """For each request, the earlier request it continues (see the module's docstring)."""
    by_prefix: dict[tuple[int, ...], int] = {}
    parents: list[int | None] = []
    for i, ids in enumerate(blocks):
        parent = None
        for k in range(len(ids), 1, -1):
            j = by_prefix.get(ids[:k])
            if j is not None and prompts[j] < prompts[i]:
                parent = j
                break
        parents.append(parent)
        if len(ids) >= 3:
            by_prefix[ids[:-1]] = i
    return parents


def _read(path: Path) -> Iterator[_Raw]:
    if path.suffix == ".jsonl":
        return _mooncake(path)
    if path.suffix == ".csv":
        return _azure(path)
    raise TraceError(f"{path}: unknown trace format (expected .jsonl Mooncake or .csv Azure)")


def _mooncake(path: Path) -> Iterator[_Raw]:
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    yield _Raw(
                        float(row["timestamp"]) / 1000,
                        int(row["input_length"]),
                        int(row["output_length"]),
                        tuple(int(h) for h in row.get("hash_ids", ())),
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise TraceError(f"{path}:{n}: not a Mooncake trace line: {exc}") from None
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc.strerror}") from None


def _azure(path: Path) -> Iterator[_Raw]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for n, row in enumerate(reader, 2):
                try:
                    yield _Raw(
                        _seconds(row["TIMESTAMP"]),
                        int(row["ContextTokens"]),
                        int(row["GeneratedTokens"]),
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise TraceError(f"{path}:{n}: not an Azure trace row: {exc}") from None
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc.strerror}") from None


def _seconds(stamp: str) -> float:
    """`2023-11-16 18:15:46.6805900` (7 fractional digits, more than `datetime` takes) as
    seconds since the epoch (UTC)."""
    whole, _, fraction = stamp.strip().partition(".")
    when = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.UTC)
    return when.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)
