"""Coalescing of many concurrent calls into few round trips."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from serve_queue.errors import ResultBackendError

__all__ = ["Batcher"]

T = TypeVar("T")
R = TypeVar("R")


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh exception per caller (one shared instance would pile up tracebacks)."""
    if isinstance(exc, ResultBackendError):
        copy = ResultBackendError(*exc.args)
        copy.__cause__ = exc.__cause__
        return copy
    return exc


class Batcher(Generic[T, R]):
    """Collects the items submitted during one event-loop tick and hands them to ``run`` as
    one list (one round trip); each caller awaits its own result.

    At most ``max_inflight`` batches run at once and a batch holds at most ``max_batch``
    items; while batches are in flight new items accumulate, so batches grow under load.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int = 1000,
        max_inflight: int = 4,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled = False
        self._inflight: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """Queue ``item`` for the next batch and wait for its own result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        self._schedule(loop)
        return await future

    async def drain(self) -> None:
        """Wait until every submitted item has been sent and answered."""
        while self._queue or self._inflight:
            if self._inflight:
                await asyncio.wait(set(self._inflight))
            else:
                await asyncio.sleep(0)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and len(self._inflight) < self._max_inflight:
            self._scheduled = True
            loop.call_soon(self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        while self._queue and len(self._inflight) < self._max_inflight:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            task = loop.create_task(self._flush(batch))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._queue:
            self._schedule(task.get_loop())

    async def _flush(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy_error(exc))
            return
        except BaseException:  # cancelled (the backend closes): the callers are cancelled too
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
