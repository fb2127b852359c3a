"""A real Celery 5.7 chord, sent on a real Redis, reaches our worker: refused loudly.

Chords are not supported yet (``serve_queue.canvas``). The header tasks must not run; Celery's
``AsyncResult`` must see FAILURE for them and for the chord itself (the body's id, the one the
caller holds), so ``get()`` raises instead of hanging; the messages must wait in the
dead-letter list with reason ``chord-unsupported``; and one warning is logged per chord.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from celery import Celery, chord

from serve_queue import TaskQueue, task
from serve_queue.canvas import ChordNotSupported
from serve_queue.consumer import Consumer
from tests.interop.conftest import MakeApp
from tests.servers import RedisServer

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


class Handlers:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:
        self.calls.append("add")
        return x + y

    @task("tasks.echo")
    async def echo(self, *args: Any, **kwargs: Any) -> list[Any]:
        self.calls.append("echo")
        return [list(args), kwargs]


@pytest.fixture
def urls(redis_server: RedisServer, redis_url: str) -> tuple[str, str]:
    return redis_url, redis_server.url(1)


@pytest.fixture
async def broker(urls: tuple[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(urls[0])
    yield client
    await client.aclose()


async def dead_letters(client: aioredis.Redis, count: int, timeout: float = 20) -> list[Any]:
    """The records on ``celery.dlq`` once ``count`` are there (oldest first)."""
    deadline = time.monotonic() + timeout
    while await client.llen("celery.dlq") < count:
        assert time.monotonic() < deadline, "dead letters did not arrive"
        await asyncio.sleep(0.05)
    return [json.loads(raw) for raw in reversed(await client.lrange("celery.dlq", 0, -1))]


async def test_a_celery_chord_is_refused_loudly(
    urls: tuple[str, str],
    celery_app: MakeApp,
    broker: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="serve_queue")
    app: Celery = celery_app(*urls)
    handlers = Handlers()
    queue = TaskQueue(urls[0], results=urls[1])
    worker: Consumer = queue.worker(handlers, concurrency=10)
    async with worker:
        header = [app.signature("tasks.add", (1, 1)), app.signature("tasks.add", (2, 2))]
        result = await asyncio.to_thread(chord(header, app.signature("tasks.echo")).apply_async)
        header_ids = [child.id for child in result.parent.results]
        with pytest.raises(ChordNotSupported, match="chords are not supported"):
            await asyncio.to_thread(result.get, timeout=20)
        letters = await dead_letters(broker, 2)
    assert handlers.calls == []  # neither the header tasks nor the body ran

    for task_id in header_ids:
        header_result = app.AsyncResult(task_id)
        assert await asyncio.to_thread(lambda r=header_result: r.state) == "FAILURE"
        error = await asyncio.to_thread(lambda r=header_result: r.result)
        assert isinstance(error, ChordNotSupported), error
        assert task_id in str(error)

    assert [letter["reason"].split(":")[0] for letter in letters] == ["chord-unsupported"] * 2
    kept = [json.loads(letter["item"])["headers"]["id"] for letter in letters]
    assert sorted(kept) == sorted(header_ids)  # the original messages, ready to be replayed
    assert worker.stats.dead_lettered["chord-unsupported"] == 2

    group_id = result.parent.id
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    about_it = [w for w in warnings if group_id in w]
    assert len(about_it) == 1, warnings  # once per chord, not once per header task
    assert "not supported" in about_it[0]
