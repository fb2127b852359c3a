"""taskiq 0.13 with taskiq-redis's ``ListQueueBroker``: the asyncio task queue that serves as
the async peer (``async def`` tasks, one ``BRPOP`` per message, results in Redis).

The worker runs as ``python -m taskiq worker benchmarks.taskiq_peer:broker --workers 1
--max-async-tasks N``, configured by ``BENCH_BROKER`` and ``BENCH_RESULTS`` (empty: no result
backend) and creating ``BENCH_READY_FILE`` once it listens. It consumes the harness's queue
list (``celery``), so the harness's backlog hand-over and ready count work unchanged; the items
are taskiq's own messages, built by ``messages()`` with taskiq's formatter, as ``kiq()`` sends.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

from taskiq import TaskiqEvents, TaskiqMessage, TaskiqState
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from benchmarks.handlers import SLEEP_S
from benchmarks.harness import QUEUE

broker: Any = ListQueueBroker(
    os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"), queue_name=QUEUE
)
if os.environ.get("BENCH_RESULTS"):
    broker = broker.with_result_backend(RedisAsyncResultBackend(os.environ["BENCH_RESULTS"]))


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _ready(state: TaskiqState) -> None:
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        await asyncio.to_thread(Path(path).touch)


@broker.task(task_name="bench.noop")
async def noop(i: int) -> None:
    return None


@broker.task(task_name="bench.sleep")
async def sleep(i: int) -> None:
    await asyncio.sleep(SLEEP_S)


def messages(task: str, count: int, first: int = 0) -> list[bytes]:
    """``count`` list items for ``task(i)``, as taskiq's ``kiq()`` would push them."""
    out = []
    for i in range(first, first + count):
        message = TaskiqMessage(
            task_id=uuid.uuid4().hex, task_name=task, labels={}, args=[i], kwargs={}
        )
        out.append(broker.formatter.dumps(message).message)
    return out
