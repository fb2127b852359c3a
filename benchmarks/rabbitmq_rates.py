# mypy: disallow-untyped-calls=False
"""Publish and drain rates of the RabbitMQ adapter (not a test: prints numbers of one run).

Usage: ``python benchmarks/rabbitmq_rates.py amqp://guest:guest@127.0.0.1:5672// [N]``

Messages are Celery-shaped (protocol v2 headers, a small JSON body). Publishing is measured
one awaited call at a time (how ``send_task`` is used from a request handler) and with many
calls in flight, with and without publisher confirms. Draining consumes and acks everything
through ``deliveries()`` + ``settle(Ack())`` with a few prefetch values, settling each
delivery in its own task as the consumer does. The same is measured with kombu + py-amqp
(Celery's own client: no confirms, one ack per message) as a baseline, in the same run: on a
shared machine only the ratios mean something.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message

from serve_queue.adapters.rabbitmq import RabbitMQAdapter
from serve_queue.protocol import SendOptions, encode_task
from serve_queue.types import Ack, Delivery, OutgoingMessage


def message() -> OutgoingMessage:
    return encode_task("tasks.add", (2, 3), {"z": "x" * 40}, SendOptions(), origin="bench@host")


async def publish(url: str, queue: str, n: int, *, confirms: bool, in_flight: int) -> float:
    adapter = RabbitMQAdapter(url, publisher_confirms=confirms)
    await adapter.connect()
    msgs = [message() for _ in range(n)]
    await adapter.publish(queue, msgs[0])  # connects and declares outside the timing
    started = time.perf_counter()
    for start in range(1, n, in_flight):
        await asyncio.gather(*(adapter.publish(queue, m) for m in msgs[start : start + in_flight]))
    elapsed = time.perf_counter() - started
    await adapter.close()
    return (n - 1) / elapsed


async def drain(url: str, queue: str, n: int, prefetch: int) -> float:
    adapter = RabbitMQAdapter(url)
    await adapter.connect()
    settled, done = 0, asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def settle(delivery: Delivery) -> None:
        nonlocal settled
        await adapter.settle(delivery, Ack())
        settled += 1
        if settled == n:
            done.set()

    started = time.perf_counter()
    iterator = adapter.deliveries([queue], prefetch)
    received = 0
    async for delivery in iterator:
        task = asyncio.create_task(settle(delivery))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        received += 1
        if received == n:
            break
    await done.wait()
    elapsed = time.perf_counter() - started
    await iterator.aclose()  # type: ignore[attr-defined]
    await adapter.close()
    return n / elapsed


def kombu_publish(url: str, queue: str, n: int) -> float:
    sample = message()
    with Connection(url) as conn:
        producer = conn.Producer()
        declare = [Queue(queue, Exchange(queue, "direct"), routing_key=queue)]
        started = 0.0
        for i in range(n):
            if i == 1:
                started = time.perf_counter()
            producer.publish(
                sample.body, exchange="", routing_key=queue, headers=dict(sample.headers),
                content_type=sample.content_type, content_encoding=sample.content_encoding,
                delivery_mode=2, priority=0, correlation_id=sample.headers["id"],
                declare=declare if i == 0 else None,
            )  # fmt: skip
        return (n - 1) / (time.perf_counter() - started)


def kombu_drain(url: str, queue: str, n: int, prefetch: int) -> float:
    acked = 0

    def on_message(msg: Message) -> None:
        nonlocal acked
        msg.ack()
        acked += 1

    with Connection(url) as conn:
        started = time.perf_counter()
        with conn.Consumer(Queue(queue), on_message=on_message, accept=["json"]) as consumer:
            consumer.qos(prefetch_count=prefetch)
            while acked < n:
                conn.drain_events(timeout=10)
        return n / (time.perf_counter() - started)


async def main(url: str, n: int) -> None:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    for confirms in (True, False):
        for in_flight in (1, 100):
            rate = await publish(url, queue, n, confirms=confirms, in_flight=in_flight)
            print(f"publish confirms={confirms!s:5} in_flight={in_flight:<4} {rate:8.0f} msg/s")
            drained = await drain(url, queue, n, prefetch=100)
            print(f"  drain prefetch=100                   {drained:8.0f} msg/s")
    rate = await asyncio.to_thread(kombu_publish, url, queue, n)
    print(f"kombu publish (no confirms)            {rate:8.0f} msg/s")
    rate = await asyncio.to_thread(kombu_drain, url, queue, n, 100)
    print(f"  kombu drain prefetch=100             {rate:8.0f} msg/s")
    for prefetch in (10, 500):
        await publish(url, queue, n, confirms=True, in_flight=100)
        drained = await drain(url, queue, n, prefetch=prefetch)
        print(f"drain prefetch={prefetch:<4}                     {drained:8.0f} msg/s")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10_000))
