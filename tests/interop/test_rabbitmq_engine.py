"""The whole engine on RabbitMQ with real Celery 5.7 peers, as on Redis:

- Celery producers run on our worker; Celery reads the results, from Redis or over ``rpc://``;
- our producer runs tasks on a real Celery worker, and on our own worker over ``rpc://``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
from celery import Celery

from serve_queue import TaskFailed, TaskQueue, task
from serve_queue.consumer import Consumer
from tests.interop.celeryapp import make_app
from tests.interop.conftest import MakeApp, StartWorker, close_app
from tests.servers import RedisServer

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(120)]
T = TypeVar("T")


class Handlers:
    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:
        return x + y

    @task("tasks.fail")
    def fail(self, msg: str) -> None:
        raise ValueError(msg)


@pytest.fixture
def celery_thread() -> Iterator[ThreadPoolExecutor]:
    """Celery's rpc:// client reads replies on the queue of the thread that sent the task."""
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


async def in_thread(pool: ThreadPoolExecutor, call: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, call)


@pytest.fixture
async def rpc_worker(amqp_url: str) -> AsyncIterator[Consumer]:
    queue = TaskQueue(amqp_url, results="rpc://")
    async with queue.worker(Handlers(), concurrency=20) as worker:
        yield worker


async def test_celery_rpc_client_reads_our_results(
    rpc_worker: Consumer, amqp_url: str, celery_thread: ThreadPoolExecutor
) -> None:
    app = make_app(amqp_url, "rpc://")
    try:
        sent = await in_thread(celery_thread, lambda: app.send_task("tasks.add", args=(2, 3)))
        assert await in_thread(celery_thread, lambda: sent.get(timeout=20)) == 5
        failed = await in_thread(celery_thread, lambda: app.send_task("tasks.fail", args=("x",)))
        with pytest.raises(ValueError, match="x"):
            await in_thread(celery_thread, lambda: failed.get(timeout=20))
    finally:
        await in_thread(celery_thread, lambda: close_app(app))


async def test_our_producer_over_rpc(rpc_worker: Consumer, amqp_url: str) -> None:
    queue = TaskQueue(amqp_url, results="rpc://")
    ok = await queue.send_task("tasks.add", args=[20, 22], priority=3)
    bad = await queue.send_task("tasks.fail", args=["nope"])
    assert await ok.get(timeout=20) == 42
    with pytest.raises(TaskFailed) as info:
        await bad.get(timeout=20)
    assert info.value.exc_type == "ValueError"
    await queue.close()


async def test_celery_producer_with_redis_results_on_our_worker(
    amqp_url: str, redis_server: RedisServer, celery_app: MakeApp
) -> None:
    results = redis_server.url(3)
    queue = TaskQueue(amqp_url, results=results)
    celery: Celery = celery_app(amqp_url, results)
    async with queue.worker(Handlers()):
        sent = await asyncio.to_thread(
            celery.tasks["tasks.add"].apply_async,
            (1, 2),
            priority=5,
            headers={"x-k": "v"},
            expires=60,
        )
        assert await asyncio.to_thread(sent.get, timeout=20) == 3


async def test_our_producer_on_a_real_celery_worker(
    amqp_url: str, redis_server: RedisServer, celery_worker: StartWorker
) -> None:
    results = redis_server.url(4)
    await asyncio.to_thread(celery_worker, amqp_url, results, pool="threads", concurrency=2)
    queue = TaskQueue(amqp_url, results=results)
    now = await queue.send_task("tasks.add", args=[2, 3])
    later = await queue.send_task("tasks.mul", args=[3, 4], countdown=0.5)
    assert await now.get(timeout=30) == 5
    assert await later.get(timeout=30) == 12
    await queue.close()
