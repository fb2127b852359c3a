"""Raw RedisAdapter throughput: publish N messages (coalesced into pipelines), then drain them
through ``deliveries()`` + ``settle(Ack())`` with a given prefetch. Not a test; prints msgs/s.

    .venv/bin/python benchmarks/redis_adapter_drain.py redis://127.0.0.1:6379/15 [N] [PREFETCH]
"""

from __future__ import annotations

import asyncio
import sys
import time

from redis.asyncio import Redis

from serve_queue.adapters.redis import RedisAdapter
from serve_queue.types import Ack, Delivery, OutgoingMessage

BODY = b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'


async def publish(adapter: RedisAdapter, queue: str, n: int) -> float:
    headers = {"lang": "py", "task": "bench.noop", "retries": 0, "timelimit": [None, None]}
    start = time.perf_counter()
    for first in range(0, n, 5000):
        await asyncio.gather(
            *(
                adapter.publish(queue, OutgoingMessage(body=BODY, headers={**headers, "id": i}))
                for i in range(first, min(first + 5000, n))
            )
        )
    return time.perf_counter() - start


async def drain(adapter: RedisAdapter, queue: str, n: int, prefetch: int) -> float:
    done = 0
    finished = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def ack(delivery: Delivery) -> None:
        nonlocal done
        await adapter.settle(delivery, Ack())
        done += 1
        if done == n:
            finished.set()

    start, cpu = time.perf_counter(), time.process_time()
    stream = adapter.deliveries([queue], prefetch)
    yielded = 0
    async for delivery in stream:
        task = asyncio.create_task(ack(delivery))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        yielded += 1
        if yielded == n:
            break
    await finished.wait()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await stream.aclose()  # type: ignore[attr-defined]
    print(f"  (this process used {cpu:.2f} CPU s = {n / cpu:,.0f} msgs per CPU second)")
    return elapsed


async def redis_cpu(url: str) -> float:
    """CPU seconds redis-server has used so far (user + sys)."""
    client = Redis.from_url(url)
    try:
        info = await client.info("cpu")
    finally:
        await client.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def main(url: str, n: int, prefetch: int) -> None:
    adapter = RedisAdapter(url)
    await adapter.connect()
    queue = "bench.redis_adapter"
    try:
        took = await publish(adapter, queue, n)
        print(f"publish {n}: {took:.2f}s = {n / took:,.0f} msgs/s")
        before = await redis_cpu(url)
        took = await drain(adapter, queue, n, prefetch)
        print(f"drain {n} (prefetch {prefetch}): {took:.2f}s = {n / took:,.0f} msgs/s")
        server = await redis_cpu(url) - before
        print(f"  (redis-server used {server:.2f} CPU s = {n / server:,.0f} msgs per CPU second)")
        print("left:", await adapter.depth(queue))
    finally:
        await adapter.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            args[0],
            int(args[1]) if len(args) > 1 else 20_000,
            int(args[2]) if len(args) > 2 else 500,
        )
    )
