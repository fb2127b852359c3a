"""The benchmark tasks as serve_queue handlers (the Celery peer registers the same names).

- ``bench.noop(i)``: returns at once.
- ``bench.sleep(i)``: I/O-bound, ``await asyncio.sleep(0.05)``.
- ``bench.latency(sent)``: records ``time.time() - sent`` (enqueue to handler start).
"""

from __future__ import annotations

import asyncio
import time

from serve_queue import task

SLEEP_S = 0.05


class BenchHandlers:
    """Handlers with type hints, as a user writes them (so arguments are validated)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []

    @task("bench.noop")
    async def noop(self, i: int) -> None:
        return None

    @task("bench.sleep")
    async def sleep(self, i: int) -> None:
        await asyncio.sleep(SLEEP_S)

    @task("bench.latency")
    async def latency(self, sent: float) -> None:
        self.latencies.append(time.time() - sent)


class SyncBenchHandlers:
    """The same no-op as a plain ``def`` (runs on the consumer's thread pool)."""

    @task("bench.noop")
    def noop(self, i: int) -> None:
        return None
