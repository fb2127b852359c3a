"""Raw SQLiteAdapter throughput on a fresh file: publish N messages one awaited call at a time
(no coalescing possible), publish N concurrently (coalesced into shared transactions), then
drain them through ``deliveries()`` + ``settle(Ack())`` with a given prefetch. Not a test;
prints msgs/s.

    .venv/bin/python benchmarks/sqlite_adapter_drain.py [N] [PREFETCH] [DIR]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from serve_queue.adapters.sqlite import SQLiteAdapter
from serve_queue.types import Ack, Delivery, OutgoingMessage

BODY = b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
HEADERS = {"lang": "py", "task": "bench.noop", "retries": 0, "timelimit": [None, None]}


def message(i: int) -> OutgoingMessage:
    return OutgoingMessage(body=BODY, headers={**HEADERS, "id": str(i)})


async def publish_one_by_one(adapter: SQLiteAdapter, queue: str, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        await adapter.publish(queue, message(i))
    return time.perf_counter() - start


async def publish_concurrently(adapter: SQLiteAdapter, queue: str, n: int) -> float:
    start = time.perf_counter()
    for first in range(0, n, 1000):  # 1,000 publishes in flight at a time
        await asyncio.gather(
            *(adapter.publish(queue, message(i)) for i in range(first, min(first + 1000, n)))
        )
    return time.perf_counter() - start


async def drain(adapter: SQLiteAdapter, queue: str, n: int, prefetch: int) -> float:
    done = 0
    finished = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def ack(delivery: Delivery) -> None:
        nonlocal done
        await adapter.settle(delivery, Ack())
        done += 1
        if done == n:
            finished.set()

    start = time.perf_counter()
    stream = adapter.deliveries([queue], prefetch)
    async for delivery in stream:
        task = asyncio.create_task(ack(delivery))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if finished.is_set() or done + len(tasks) >= n:
            break
    await finished.wait()
    elapsed = time.perf_counter() - start
    await stream.aclose()  # type: ignore[attr-defined]
    return elapsed


async def main(n: int, prefetch: int, directory: str | None) -> None:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        adapter = SQLiteAdapter(f"sqlite://{Path(tmp) / 'bench.db'}")
        await adapter.connect()
        queue = "bench.sqlite_adapter"
        try:
            took = await publish_one_by_one(adapter, queue, n)
            print(f"publish {n} one by one: {took:.2f}s = {n / took:,.0f} msgs/s")
            took = await drain(adapter, queue, n, prefetch)
            print(f"drain {n} (prefetch {prefetch}): {took:.2f}s = {n / took:,.0f} msgs/s")
            took = await publish_concurrently(adapter, queue, n)
            print(f"publish {n} concurrently: {took:.2f}s = {n / took:,.0f} msgs/s")
            took = await drain(adapter, queue, n, prefetch)
            print(f"drain {n} (prefetch {prefetch}): {took:.2f}s = {n / took:,.0f} msgs/s")
            print("left:", await adapter.depth(queue))
        finally:
            await adapter.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            int(args[0]) if args else 10_000,
            int(args[1]) if len(args) > 1 else 200,
            args[2] if len(args) > 2 else None,
        )
    )
