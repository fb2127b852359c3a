"""Runs one handler call: ``async def`` on the event loop, plain ``def`` on a bounded pool.

The pool never blocks the loop: a sync handler waits for a free thread as an ``await``. The
caller's contextvars travel into the thread, so logging context and traces follow the task.

Time limits, as in Celery but in asyncio terms:

- soft limit: an async handler is cancelled (it may catch ``CancelledError`` and return);
  an uncaught cancellation becomes ``SoftTimeLimitExceeded``.
- hard limit: the call is abandoned and ``TimeLimitExceeded`` is raised at once. An async
  handler is cancelled; a thread cannot be killed, so a runaway sync handler keeps its thread
  until it returns (the pool is bounded, so this is visible as reduced capacity).

A sync handler's limits count from the moment a pool thread starts the call: waiting for a
free thread is queueing, not running, so a saturated pool never times out a task that has not
started. Without limits the call goes straight to the pool (no start signal is made).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

__all__ = ["Executor", "SoftTimeLimitExceeded", "TimeLimitExceeded"]

P = ParamSpec("P")
T = TypeVar("T")


class SoftTimeLimitExceeded(Exception):
    """The handler ran past its soft time limit and did not handle the cancellation."""


class TimeLimitExceeded(Exception):
    """The handler ran past its hard time limit and was abandoned."""

    def __init__(self, limit: float) -> None:
        super().__init__(limit)
        self.limit = limit


class Executor:
    """Runs handler calls; owns the bounded thread pool for sync handlers."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="serve-queue")
        self.threads = threads

    async def run_sync(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking callable on the pool, with the caller's contextvars."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    async def run(
        self,
        func: Callable[..., Any],
        is_async: bool,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
    ) -> Any:
        """Call ``func(*args, **kwargs)`` and return its result, honouring the time limits."""
        if soft_time_limit is None and time_limit is None:
            if is_async:
                return await func(*args, **kwargs)
            return await self.run_sync(func, *args, **kwargs)
        if is_async:
            return await _with_limits(func(*args, **kwargs), True, soft_time_limit, time_limit)
        running = await self._started_on_pool(func, args, kwargs)
        return await _with_limits(running, False, soft_time_limit, time_limit)

    async def _started_on_pool(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> asyncio.Future[Any]:
        """Submit ``func`` to the pool and return its future once a thread has begun the call
        (or once it finished or was cancelled before any thread took it)."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        context = contextvars.copy_context()

        def begin() -> Any:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve, started)
            return context.run(func, *args, **kwargs)

        future = loop.run_in_executor(self._pool, begin)
        try:
            await asyncio.wait({started, future}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.cancel()  # still queued: never runs; already running: abandoned
            raise
        return future

    def shutdown(self, *, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _resolve(started: asyncio.Future[None]) -> None:
    if not started.done():
        started.set_result(None)


async def _with_limits(
    coro: Awaitable[Any], cancellable: bool, soft: float | None, hard: float | None
) -> Any:
    task = asyncio.ensure_future(coro)
    first = soft if soft is not None else hard
    assert first is not None
    try:
        done, _ = await asyncio.wait({task}, timeout=first)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    if soft is not None and cancellable:
        task.cancel()
        grace = None if hard is None else max(hard - soft, 0.0)
        done, _ = await asyncio.wait({task}, timeout=grace)
        if done:
            try:
                return task.result()
            except asyncio.CancelledError:
                raise SoftTimeLimitExceeded() from None
    elif soft is not None and hard is not None:
        # a thread cannot be interrupted at the soft limit: wait on until the hard one
        done, _ = await asyncio.wait({task}, timeout=hard - soft)
        if done:
            return task.result()
    task.cancel()
    if hard is None:
        raise SoftTimeLimitExceeded()
    raise TimeLimitExceeded(hard)
