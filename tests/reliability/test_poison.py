"""Nothing a broker hands us stops a consumer (issue 16): real workers on real brokers."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from serve_queue import TaskQueue, task
from serve_queue.adapters.memory import MemoryAdapter, MemoryBroker
from serve_queue.consumer import Consumer
from serve_queue.registry import Registry
from serve_queue.results.local import MemoryResultBackend
from serve_queue.types import Delivery
from tests.adapters.fuzz import hostile_items

T = TypeVar("T")


class Handlers:
    @task("poison.add")
    async def add(self, x: int, y: int) -> int:
        return x + y


async def dead_letter_reasons(url: str, queue: str) -> list[str]:
    client = aioredis.Redis.from_url(url)
    try:
        return [json.loads(r)["reason"] for r in await client.lrange(f"{queue}.dlq", 0, -1)]
    finally:
        await client.aclose()


async def all_succeed(results: list[tuple[int, Any]]) -> None:
    """Every valid task ``poison.add(i, 1)`` returned ``i + 1``."""
    for i, result in results:
        assert await result.get(timeout=20) == i + 1


async def until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], why: str, timeout: float = 20
) -> T:
    """Probe every 0.1 s until ``ok``; fail with ``why`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ok(value := await probe()):
        assert time.monotonic() < deadline, f"{why}: {value!r}"
        await asyncio.sleep(0.1)
    return value


@pytest.mark.timeout(60)
async def test_a_deeply_nested_item_is_dead_lettered_and_the_task_behind_it_runs(
    redis_url: str,
) -> None:
    """The issue's reproduction: 5,000 levels of JSON on the list, then a valid task."""
    queue = TaskQueue(redis_url, results=redis_url.rsplit("/", 1)[0] + "/1")
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.lpush("celery", b'{"a":' * 5000 + b"1" + b"}" * 5000)
        await client.lpush("celery", b"[" * 5000 + b"]" * 5000)
    finally:
        await client.aclose()
    result = await queue.send_task("poison.add", args=[2, 3])
    worker = queue.worker(Handlers(), concurrency=10)
    async with worker:
        assert await result.get(timeout=15) == 5
        assert worker.health().ok
    reasons = await dead_letter_reasons(redis_url, "celery")
    assert len(reasons) == 2 and all(reasons), reasons
    await queue.close()


@pytest.mark.timeout(120)
async def test_fuzz_on_redis_every_valid_task_succeeds_and_every_bad_item_is_dead_lettered(
    redis_url: str,
) -> None:
    """200 hostile items (seed 16) among 50 valid tasks, on a real redis-server."""
    rng = random.Random(16)
    hostile = list(hostile_items(rng, 200))
    queue = TaskQueue(redis_url, results=redis_url.rsplit("/", 1)[0] + "/1")
    client = aioredis.Redis.from_url(redis_url)
    results = []
    try:
        for i, raw in enumerate(hostile):
            await client.lpush("celery", raw)
            if i % 4 == 0:
                results.append((i, await queue.send_task("poison.add", args=[i, 1])))
        worker = queue.worker(Handlers(), concurrency=50)
        async with worker:
            await all_succeed(results)
            await until(
                lambda: dead_letter_reasons(redis_url, "celery"),
                lambda reasons: len(reasons) >= len(hostile),
                "not every hostile item was dead-lettered",
            )
            assert worker.health().ok, worker.health()
            depth = await worker.adapter.depth("celery")
            assert depth.total == 0, depth
        reasons = await dead_letter_reasons(redis_url, "celery")
        assert len(reasons) == len(hostile) and all(reasons)
    finally:
        await client.aclose()
        await queue.close()


class CrashingAdapter(MemoryAdapter):
    """A memory adapter whose stream crashes (a bug, not a broker error) ``crashes`` times."""

    def __init__(self, broker: MemoryBroker, crashes: int) -> None:
        super().__init__(broker=broker)
        self.crashes = crashes

    async def deliveries(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        if self.crashes > 0:
            self.crashes -= 1
            raise RuntimeError("a bug in the stream")
        async for delivery in super().deliveries(queues, prefetch):
            yield delivery


async def test_a_crashing_fetch_loop_restarts_logs_once_and_reports_unhealthy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker("crash")
    adapter = CrashingAdapter(broker, crashes=4)
    producer = TaskQueue("memory://crash", results="memory://", broker_options={"broker": broker})
    backend = MemoryResultBackend()
    config = producer.consumer_config(None, concurrency=5)
    consumer = Consumer(adapter, Registry.from_objects(Handlers()), backend=backend, config=config)
    result_id = (await producer.send_task("poison.add", args=[1, 1])).id
    unhealthy: list[Any] = []
    with caplog.at_level(logging.ERROR, logger="serve_queue.consumer"):
        async with consumer:
            deadline = time.monotonic() + 15
            while (meta := await backend.get(result_id)) is None:
                if not consumer.health().ok:
                    unhealthy.append(consumer.health().reason)
                assert time.monotonic() < deadline, "the task never ran after the crashes"
                await asyncio.sleep(0.02)
            assert meta["status"] == "SUCCESS"
            assert consumer.health().ok, "healthy again once deliveries come through"
    assert unhealthy and "fetch loop failed" in unhealthy[0]
    logged = [r for r in caplog.records if "fetch loop failed" in r.getMessage()]
    assert len(logged) == 1, "one cause is logged once, however often it recurs"
    await producer.close()


def hostile_amqp(rng: random.Random, count: int) -> list[tuple[bytes, dict[str, Any]]]:
    """(body, headers) pairs: hostile bodies, and Celery headers with wrong types at every
    field (a table 200 deep among them)."""
    wrong: list[Any] = [None, 5, -1, 2**62, 1.5, "", "x" * 5000, [], [1, [2]], {}, True]
    nested: Any = 1
    for _ in range(200):
        nested = {"a": nested}
    wrong.append(nested)
    fields = ["task", "id", "retries", "eta", "expires", "timelimit", "argsrepr", "root_id"]
    bodies = list(hostile_items(rng, count))
    out = []
    for serial, body in enumerate(bodies):
        headers: dict[str, Any] = {"task": "poison.add", "id": f"bad-{serial}", "lang": "py"}
        headers[rng.choice(fields)] = rng.choice(wrong)
        if rng.random() < 0.5:  # a valid body under broken headers
            body = json.dumps([[serial, 1], {}, {}]).encode()
            headers["task"] = rng.choice(wrong) if headers["task"] == "poison.add" else 7
        out.append((body, headers))
    return out


@pytest.mark.timeout(120)
async def test_fuzz_on_rabbitmq_every_valid_task_succeeds_and_every_bad_item_is_dead_lettered(
    amqp_url: str, redis_url: str
) -> None:
    """150 hostile messages (seed 16) among valid tasks, on a real rabbitmq-server: wrong
    header types, deep tables and bad bodies are dead-lettered; the consumer never stops."""
    import aio_pika

    rng = random.Random(16)
    hostile = hostile_amqp(rng, 150)
    queue = TaskQueue(amqp_url, results=redis_url.rsplit("/", 1)[0] + "/1")
    results = []
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue("celery", durable=True)
        for i, (body, headers) in enumerate(hostile):
            message = aio_pika.Message(body, headers=headers, content_type="application/json",
                                       content_encoding="utf-8")  # fmt: skip
            await channel.default_exchange.publish(message, routing_key="celery")
            if i % 3 == 0:
                results.append((i, await queue.send_task("poison.add", args=[i, 1])))
        worker = queue.worker(Handlers(), concurrency=50)
        async with worker:
            await all_succeed(results)
            await until(
                lambda: worker.adapter.depth("celery.dlq"),
                lambda depth: depth.ready >= len(hostile),
                "not every hostile message was dead-lettered",
            )
            assert worker.health().ok, worker.health()
            assert (await worker.adapter.depth("celery")).total == 0
    finally:
        await connection.close()
        await queue.close()


@pytest.mark.timeout(120)
async def test_fuzz_on_sqlite_every_valid_task_succeeds_and_every_bad_item_is_dead_lettered(
    tmp_path: Any,
) -> None:
    """150 hostile rows (seed 16) among valid tasks in the embedded broker's own file:
    unreadable header/property columns and hostile bodies under sane ones."""
    import sqlite3

    rng = random.Random(16)
    hostile = list(hostile_items(rng, 150))
    queue = TaskQueue(f"sqlite:///{tmp_path / 'fuzz.db'}")
    results = [(-1, await queue.send_task("poison.add", args=[0, 0]))]  # creates the schema
    for i, raw in enumerate(hostile):
        text = raw.decode(errors="replace")
        columns = (text, text) if i % 2 else ('{"task": "poison.add"}', "{}")
        with sqlite3.connect(tmp_path / "fuzz.db") as conn:
            conn.execute(
                "INSERT INTO messages (queue, body, content_type, content_encoding, headers, "
                "properties, enqueued_at, ready_at) VALUES (?, ?, 'application/json', 'utf-8', "
                "?, ?, 0, 0)",
                ("celery", raw, *columns),
            )
        if i % 3 == 0:
            results.append((i, await queue.send_task("poison.add", args=[i, 1])))
    worker = queue.worker(Handlers(), concurrency=50)
    try:
        async with worker:
            for i, result in results:
                assert await result.get(timeout=20) == i + 1
            deadline = time.monotonic() + 20
            while (await worker.adapter.depth("celery")).total:
                assert time.monotonic() < deadline, "hostile rows left on the queue"
                await asyncio.sleep(0.1)
            assert worker.health().ok, worker.health()
            letters = await worker.adapter.dead_letters("celery")  # type: ignore[attr-defined]
            assert len(letters) == len(hostile) and all(letter.reason for letter in letters)
    finally:
        await queue.close()
