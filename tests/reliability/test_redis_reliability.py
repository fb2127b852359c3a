"""Issue 2's checks, against a real redis-server and real worker processes:

- a worker SIGKILLed with 100 tasks in flight, then restarted: every task completes;
- a 10,000-message backlog drains with the worker's RSS flat (the prefetch bound holds);
- 1,000 random byte strings and 1,000 structurally mutated envelopes: the worker keeps
  serving valid tasks and every bad item lands in the dead-letter list.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import signal
import time
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis

from serve_queue import TaskQueue, task
from tests.reliability.conftest import StartWorker
from tests.servers import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def urls(redis_server: RedisServer, redis_url: str) -> tuple[str, str, str]:
    """Broker, results and the marks DB the handlers write to."""
    return redis_url, redis_server.url(1), redis_server.url(2)


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_sigkill_with_100_in_flight_loses_nothing(
    urls: tuple[str, str, str], worker_process: StartWorker
) -> None:
    broker, results, marks_url = urls
    marks = aioredis.Redis.from_url(marks_url)
    await marks.set("rel:sleep", 60)  # the first worker never finishes on its own
    first = worker_process(
        broker, results, marks_url, "--concurrency", "100", "--visibility-timeout", "3"
    )
    queue = TaskQueue(broker, results=results)
    sent = [await queue.send_task("rel.work", args=[n]) for n in range(100)]

    async def all_started() -> bool:
        return bool(await marks.hlen("rel:started") == 100)

    await wait_for(all_started, 30, "100 tasks in flight")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    await marks.set("rel:sleep", 0.05)
    worker_process(broker, results, marks_url, "--concurrency", "100", "--visibility-timeout", "3")

    values = await asyncio.gather(*(r.get(timeout=60) for r in sent))
    assert sorted(values) == list(range(100))
    started = {int(k): int(v) for k, v in (await marks.hgetall("rel:started")).items()}
    assert all(started[n] == 2 for n in range(100))  # killed once, redelivered once
    assert len(await marks.hgetall("rel:done")) == 100
    assert (await queue.depth()).total == 0
    await queue.close()
    await marks.aclose()


async def test_backlog_of_10000_drains_with_flat_rss(
    urls: tuple[str, str, str], worker_process: StartWorker
) -> None:
    broker, results, marks_url = urls
    queue = TaskQueue(broker, results=results)
    for start in range(0, 10_000, 1000):
        await asyncio.gather(
            *(queue.send_task("rel.noop", args=[n]) for n in range(start, start + 1000))
        )
    assert (await queue.depth()).ready == 10_000

    proc = worker_process(broker, results, marks_url, "--concurrency", "100")
    process = psutil.Process(proc.pid)
    samples: list[tuple[int, int, int]] = []  # (remaining, reserved, rss)
    while True:
        depth = await queue.depth()
        samples.append((depth.ready + depth.reserved, depth.reserved, process.memory_info().rss))
        if depth.total == 0:
            break
        await asyncio.sleep(0.05)
    assert max(reserved for _, reserved, _ in samples) <= 100  # prefetch bound held
    warm = [rss for remaining, _, rss in samples if remaining <= 9_000]
    assert warm, "drained before a warm sample was taken"
    growth = (max(warm) - warm[0]) / warm[0]
    assert growth < 0.10, f"RSS grew {growth:.0%} while draining ({warm[0]} -> {max(warm)} bytes)"
    await queue.close()


def _envelope(task_id: str, name: str, payload: Any, **overrides: Any) -> dict[str, Any]:
    data = json.dumps(payload).encode()
    envelope: dict[str, Any] = {
        "body": base64.b64encode(data).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": name,
            "id": task_id,
            "retries": 0,
            "timelimit": [None, None],
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "fuzz"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": f"tag-{task_id}",
        },
    }
    envelope.update(overrides)
    return envelope


def _mutations(rng: random.Random, n: int) -> dict[str, Any]:
    """Envelopes that are each certainly not a runnable ``tasks.add``, each in its own way."""
    tid = f"bad-{n}"
    good_body = [[1, 2], {}, {}]
    kind = n % 10
    if kind == 0:  # body is not JSON
        return _envelope(tid, "tasks.add", None, body=base64.b64encode(rng.randbytes(40)).decode())
    if kind == 1:  # body is not base64
        return _envelope(tid, "tasks.add", None, body="%%% not base64 %%%")
    if kind == 2:  # no task header, body not a v1 task
        env = _envelope(tid, "tasks.add", good_body)
        del env["headers"]["task"]
        return env
    if kind == 3:  # unknown task
        return _envelope(tid, f"tasks.unknown{rng.randrange(10**6)}", good_body)
    if kind == 4:  # arguments of the wrong type
        return _envelope(tid, "tasks.add", [["a", {"b": 1}], {}, {}])
    if kind == 5:  # a serializer that is not allowed
        return _envelope(
            tid, "tasks.add", good_body, **{"content-type": "application/x-python-serialize"}
        )
    if kind == 6:  # no properties at all
        env = _envelope(tid, "tasks.add", good_body)
        del env["properties"]
        return env
    if kind == 7:  # headers of the wrong shape
        return _envelope(tid, "tasks.add", good_body, headers=["task", "tasks.add"])
    if kind == 8:  # a malformed eta
        env = _envelope(tid, "tasks.add", good_body)
        env["headers"]["eta"] = "next tuesday"
        return env
    return _envelope(tid, "tasks.add", [5, {}, {}])  # args not a list


class Adder:
    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:
        return x + y


async def test_garbage_is_dead_lettered_and_valid_work_goes_on(urls: tuple[str, str, str]) -> None:
    broker, results, _ = urls
    rng = random.Random(20261123)
    raw = aioredis.Redis.from_url(broker)
    items: list[bytes] = [rng.randbytes(rng.randrange(1, 200)) for _ in range(1000)]
    items += [json.dumps(_mutations(rng, n)).encode() for n in range(1000)]
    rng.shuffle(items)
    queue = TaskQueue(broker, results=results, default_queue="fuzz")
    async with queue.worker(Adder(), queues=["fuzz"], concurrency=100) as worker:
        sent = []
        for chunk in range(0, len(items), 100):
            await raw.lpush("fuzz", *items[chunk : chunk + 100])
            sent.append(await queue.send_task("tasks.add", args=[chunk, 1]))
        values = await asyncio.gather(*(r.get(timeout=60) for r in sent))
        assert values == [chunk + 1 for chunk in range(0, len(items), 100)]

        async def all_dead_lettered() -> bool:
            return bool(await raw.llen("fuzz.dlq") >= 2000)

        await wait_for(all_dead_lettered, 60, "2,000 dead letters")
        assert worker.health().ok
    assert await raw.llen("fuzz.dlq") == 2000
    records = [json.loads(r) for r in await raw.lrange("fuzz.dlq", 0, -1)]
    assert all(r["reason"] and r["queue"] == "fuzz" for r in records)
    kept = {
        base64.b64decode(r["item"]) if r.get("item_encoding") == "base64" else r["item"].encode()
        for r in records
    }
    assert kept == set(items)  # every original item, byte for byte
    assert (await queue.depth("fuzz")).total == 0
    await queue.close()
    await raw.aclose()


async def test_cli_worker_drains_on_sigterm(
    urls: tuple[str, str, str], worker_process: StartWorker
) -> None:
    """SIGTERM stops fetching, lets the running task finish, hands the rest back, exits 0."""
    broker, results, marks_url = urls
    marks = aioredis.Redis.from_url(marks_url)
    await marks.set("rel:sleep", 1.5)
    proc = worker_process(broker, results, marks_url, "--concurrency", "1", "--drain-timeout", "20")
    queue = TaskQueue(broker, results=results)
    running = await queue.send_task("rel.work", args=[1])
    waiting = [await queue.send_task("rel.work", args=[n]) for n in (2, 3)]

    async def started() -> bool:
        return bool(await marks.hget("rel:started", "1"))

    await wait_for(started, 30, "the first task to start")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert await running.get(timeout=1) == 1  # finished during the drain
    assert [await r.state() for r in waiting] == ["PENDING", "PENDING"]
    depth = await queue.depth()
    assert (depth.ready, depth.reserved) == (2, 0)  # handed back at once, not leased
    await queue.close()
    await marks.aclose()
