"""What a whole request's coroutine shape costs, against the same path as plain calls and a
callback: the most that rewriting the request path without coroutines could save.

The shape is the gateway's (`service.py`, `dispatch/forward.py`, `http/client.py`): a task per
request (the connection's `_serve_pending`) -> `handle` -> `infer` -> `_infer`, which yields
once (the catch-up before admission) and awaits `_hold`, then `_dispatch` -> `forward` ->
`_try` -> `_commit` -> `_exchange`, which waits for the point's head (a future); back in
`_dispatch`, `whole` yields once more (the catch-up before the answer). Eleven coroutines,
three suspensions resumed through their chains. The other side makes the same calls on the
way down, and on the way back from the head's done-callback. Neither does any of the work:
the difference is the coroutines' own cost. 64 requests a batch, as at c=64, on uvloop.

Usage: python bench/shape.py [--rounds 4] [--batches 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import types
from collections.abc import Generator
from typing import Any

import uvloop

BATCH = 64


@types.coroutine
def _turn() -> Generator[None, None, None]:
    yield


async def _exchange(head: asyncio.Future[int]) -> int:
    return await head


async def _commit(head: asyncio.Future[int]) -> int:
    return await _exchange(head)


async def _try(head: asyncio.Future[int]) -> int:
    return await _commit(head)


async def _forward(head: asyncio.Future[int]) -> int:
    return await _try(head)


async def _whole(answer: int) -> int:
    await _turn()
    return answer


async def _dispatch(head: asyncio.Future[int]) -> int:
    return await _whole(await _forward(head))


async def _hold() -> int:
    return 1


async def _infer_inner(head: asyncio.Future[int]) -> int:
    await _turn()
    await _hold()
    return await _dispatch(head)


async def _infer(head: asyncio.Future[int]) -> int:
    return await _infer_inner(head)


async def _handle(head: asyncio.Future[int]) -> int:
    return await _infer(head)


async def _serve_pending(head: asyncio.Future[int]) -> int:
    return await _handle(head)


def _call(value: Any) -> Any:
    return value


def _way_down(head: asyncio.Future[int]) -> None:
    """The ten calls the coroutine side makes before it waits for the head."""
    _call(_call(_call(_call(_call(_call(_call(_call(_call(_call(head))))))))))


def _way_back(head: asyncio.Future[int]) -> None:
    """The six frames the answer passes back through (`_exchange` up to `_dispatch`, `whole`)."""
    _call(_call(_call(_call(_call(_call(head.result()))))))


async def _settle() -> None:
    for _ in range(3):  # the turns the three suspensions take
        await asyncio.sleep(0)


async def coroutines(batches: int) -> float:
    """CPU seconds per request, the coroutine shape."""
    loop = asyncio.get_running_loop()
    start = time.thread_time()
    for _ in range(batches):
        heads = [loop.create_future() for _ in range(BATCH)]
        tasks = [loop.create_task(_serve_pending(head)) for head in heads]
        await _settle()
        for head in heads:
            head.set_result(1)
        await _settle()
        assert all(task.done() for task in tasks)
    return (time.thread_time() - start) / (batches * BATCH)


async def callbacks(batches: int) -> float:
    """CPU seconds per request, the same calls and a done-callback."""
    loop = asyncio.get_running_loop()
    start = time.thread_time()
    for _ in range(batches):
        heads: list[asyncio.Future[int]] = [loop.create_future() for _ in range(BATCH)]
        for head in heads:
            _way_down(head)
            head.add_done_callback(_way_back)
        await _settle()
        for head in heads:
            head.set_result(1)
        await _settle()
    return (time.thread_time() - start) / (batches * BATCH)


async def _rounds(rounds: int, batches: int) -> None:
    for n in range(rounds):
        a = await coroutines(batches)
        b = await callbacks(batches)
        print(
            f"round {n + 1}: coroutines {a * 1e6:.2f} us, calls and a callback {b * 1e6:.2f} us, "
            f"difference {(a - b) * 1e6:.2f} us per request"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=1500)
    args = parser.parse_args()
    uvloop.run(_rounds(args.rounds, args.batches))


if __name__ == "__main__":
    main()
