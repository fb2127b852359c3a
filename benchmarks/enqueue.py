"""One enqueue run in a process of its own; prints ``{"elapsed_s": ..., ...}`` as JSON.

    python -m benchmarks.enqueue ours --broker URL --count N --producers P
    python -m benchmarks.enqueue celery --broker URL --count N
    python -m benchmarks.enqueue raw --broker amqp://... --count N

``ours``: ``P`` coroutines each ``await queue.send_task("bench.noop", args=[i])`` in turn.
``celery``: Celery's ``app.send_task("bench.noop", args=[i])`` in a loop. Both connect (and
send one message to another queue) before the clock starts. ``raw``: the RabbitMQ node's own
ceiling, frames of one message written as fast as the broker confirms them (see
``benchmarks/amqp_floor.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time


async def ours(broker: str, count: int, producers: int) -> float:
    from serve_queue import TaskQueue

    queue = TaskQueue(broker)
    await queue.send_task("bench.noop", args=[0], queue="warmup")
    share = [count // producers + (1 if k < count % producers else 0) for k in range(producers)]

    async def produce(n: int) -> None:
        for i in range(n):
            await queue.send_task("bench.noop", args=[i])

    started = time.perf_counter()
    await asyncio.gather(*(produce(n) for n in share))
    elapsed = time.perf_counter() - started
    await queue.close()
    return elapsed


def celery(broker: str, count: int) -> float:
    os.environ["BENCH_BROKER"] = broker
    os.environ["BENCH_RESULTS"] = ""
    from benchmarks.celery_peer import app

    app.send_task("bench.noop", args=[0], queue="warmup")
    started = time.perf_counter()
    for i in range(count):
        app.send_task("bench.noop", args=[i], queue="celery")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["ours", "celery", "raw"])
    parser.add_argument("--broker", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--producers", type=int, default=100)
    args = parser.parse_args()
    cpu = time.process_time()
    if args.kind == "ours":
        elapsed = asyncio.run(ours(args.broker, args.count, args.producers))
    elif args.kind == "raw":
        from benchmarks.amqp_floor import publish

        elapsed = asyncio.run(publish(args.broker, "celery", args.count))
    else:
        elapsed = celery(args.broker, args.count)
    cpu = time.process_time() - cpu
    print(json.dumps({"elapsed_s": elapsed, "count": args.count, "cpu_s": cpu}))


if __name__ == "__main__":
    main()
