"""serve_queue and real Celery 5.7 on one real Redis, in both directions.

- A Celery producer's ``send_task``, ``.delay()`` and ``apply_async(priority=, headers=,
  expires=)`` run on our worker, and Celery's ``AsyncResult`` reads what we stored.
- What our producer sends runs on a real Celery worker, and we read Celery's results.
- Unknown names and bad arguments from Celery get the FAILURE Celery clients expect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import NotRegistered

from serve_queue import Retry, TaskFailed, TaskQueue, task
from serve_queue.consumer import Consumer
from tests.interop.conftest import MakeApp, StartWorker
from tests.servers import RedisServer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


class Handlers:
    """Our side of the wire: the same names the Celery test app uses."""

    def __init__(self) -> None:
        self.seen_headers: list[Any] = []
        self.flaky_calls = 0

    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:
        return x + y

    @task("tasks.mul")
    def mul(self, x: int, y: int) -> int:  # a plain def: runs on the thread pool
        return x * y

    @task("tasks.echo")
    async def echo(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    @task("tasks.fail")
    async def fail(self, msg: str) -> None:
        raise ValueError(msg)

    @task("tasks.flaky", max_retries=5)
    async def flaky(self) -> str:
        self.flaky_calls += 1
        if self.flaky_calls < 3:
            raise Retry(0.1)
        return "third time"


@pytest.fixture
def urls(redis_server: RedisServer, redis_url: str) -> tuple[str, str]:
    return redis_url, redis_server.url(1)


@pytest.fixture
async def our_worker(urls: tuple[str, str]) -> AsyncIterator[Consumer]:
    queue = TaskQueue(urls[0], results=urls[1])
    async with queue.worker(Handlers(), concurrency=50, threads=4) as worker:
        yield worker


@pytest.fixture
def celery(urls: tuple[str, str], celery_app: MakeApp) -> Celery:
    return celery_app(*urls)


async def celery_get(app: Celery, task_id: str, timeout: float = 20) -> Any:
    """Celery's blocking AsyncResult.get(), off the event loop."""
    return await asyncio.to_thread(app.AsyncResult(task_id).get, timeout=timeout)


async def test_celery_producers_run_on_our_worker(our_worker: Consumer, celery: Celery) -> None:
    sent = await asyncio.to_thread(celery.send_task, "tasks.add", args=(2, 3))
    assert await celery_get(celery, sent.id) == 5

    delayed = await asyncio.to_thread(celery.tasks["tasks.mul"].delay, 6, 7)
    assert await celery_get(celery, delayed.id) == 42

    rich = await asyncio.to_thread(
        celery.tasks["tasks.echo"].apply_async,
        args=(1, "two"),
        kwargs={"three": 3},
        priority=5,
        headers={"x-tenant": "t1"},
        expires=60,
    )
    assert await celery_get(celery, rich.id) == [[1, "two"], {"three": 3}]
    assert await asyncio.to_thread(lambda: celery.AsyncResult(rich.id).state) == "SUCCESS"


async def test_celery_sees_our_failures_and_retries(our_worker: Consumer, celery: Celery) -> None:
    failed = await asyncio.to_thread(celery.send_task, "tasks.fail", args=("nope",))
    with pytest.raises(ValueError, match="nope"):
        await celery_get(celery, failed.id)

    flaky = await asyncio.to_thread(celery.send_task, "tasks.flaky")
    assert await celery_get(celery, flaky.id) == "third time"
    assert our_worker.stats.retried == 2


async def test_poison_from_celery_fails_the_way_celery_clients_expect(
    our_worker: Consumer, celery: Celery
) -> None:
    unknown = await asyncio.to_thread(celery.send_task, "tasks.does_not_exist", args=(1,))
    with pytest.raises(NotRegistered):
        await celery_get(celery, unknown.id)

    bad = await asyncio.to_thread(celery.send_task, "tasks.add", args=("x", "y", "z"))
    with pytest.raises(Exception) as info:
        await celery_get(celery, bad.id)
    assert "do not match" in str(info.value)

    still_serving = await asyncio.to_thread(celery.send_task, "tasks.add", args=(1, 1))
    assert await celery_get(celery, still_serving.id) == 2
    assert sum(our_worker.stats.dead_lettered.values()) == 2


async def test_our_producer_runs_on_a_real_celery_worker(
    urls: tuple[str, str], celery_worker: StartWorker, celery: Celery
) -> None:
    await asyncio.to_thread(celery_worker, urls[0], urls[1], pool="threads", concurrency=4)
    queue = TaskQueue(urls[0], results=urls[1])
    plain = await queue.send_task("tasks.add", args=[2, 3])
    later = await queue.send_task("tasks.mul", args=[3, 4], countdown=0.5, priority=9)
    expiring = await queue.send_task(
        "tasks.echo", args=["a"], kwargs={"k": 1}, expires=60, headers={"x-trace": "abc"}
    )
    failing = await queue.send_task("tasks.fail", args=["from celery"])

    assert await plain.get(timeout=20) == 5
    assert await later.get(timeout=20) == 12
    assert await expiring.get(timeout=20) == [["a"], {"k": 1}]
    with pytest.raises(TaskFailed) as info:
        await failing.get(timeout=20)
    assert (info.value.exc_type, info.value.exc_message) == ("ValueError", ["from celery"])
    # Celery's own client agrees with ours
    assert await celery_get(celery, plain.id) == 5
    await queue.close()
