"""Handlers run by worker subprocesses in the reliability tests.

They record every start and finish in a Redis hash (``$SQ_MARKS_URL``), so a test can count
executions across worker processes that it SIGKILLs. ``rel.work`` sleeps for the number of
seconds stored under ``rel:sleep`` (read when it starts), so a test can make tasks long while it
kills a worker and short for the worker that takes over.
"""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as aioredis

from serve_queue import task


class Handlers:
    def __init__(self) -> None:
        self.marks = aioredis.Redis.from_url(os.environ["SQ_MARKS_URL"])

    @task("rel.work")
    async def work(self, n: int) -> int:
        await self.marks.hincrby("rel:started", str(n), 1)
        await asyncio.sleep(float(await self.marks.get("rel:sleep") or 0))
        await self.marks.hincrby("rel:done", str(n), 1)
        return n

    @task("rel.noop")
    async def noop(self, n: int) -> int:
        return n
