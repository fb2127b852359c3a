"""The one thread that owns an SQLite connection, and the coalescing of writes onto it.

``sqlite3`` connections are bound to the thread that made them and every call blocks, so each
adapter or result backend gets a single-worker executor that opens, uses and closes its
``Store``; the event loop only awaits futures. Writes requested in the same loop iteration
(hundreds of concurrent settles, publishes or result stores) are applied in one transaction;
each caller awaits its own future.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from serve_queue.adapters._sqlite_schema import Store
from serve_queue.errors import ServeQueueError

__all__ = ["DatabaseThread", "ReadyWatch", "nap"]

T = TypeVar("T")
_Op = Callable[[Store], Any]
_FAST_POLL_S = 0.005


class DatabaseThread:
    """Runs ``Store`` operations on a dedicated thread; translates ``sqlite3`` errors.

    ``OperationalError`` (locked, busy, cannot open, I/O) becomes ``unavailable``; any other
    ``sqlite3.Error`` becomes ``failure``. Both keep the original as ``__cause__``.
    """

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float,
        unavailable: type[ServeQueueError],
        failure: type[ServeQueueError],
    ) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._unavailable = unavailable
        self._failure = failure
        self._executor: ThreadPoolExecutor | None = None
        self._store: Store | None = None  # touched on the database thread only
        self._pending: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve_queue-sqlite")
        try:
            await self._submit(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def stop(self, final: _Op | None = None) -> None:
        """Finish queued writes, then run ``final`` (if any) and close, after all else.

        Work is submitted to the thread in call order, so nothing submitted before ``stop``
        can land after ``final``.
        """
        executor = self._executor
        if executor is None:
            return
        try:
            if self._flusher is not None:
                await asyncio.shield(self._flusher)
        finally:
            try:
                await self._submit(lambda: self._shutdown(final))
            finally:
                self._executor = None
                executor.shutdown(wait=False)

    def call(self, op: Callable[[Store], T]) -> asyncio.Future[T]:
        """Submit one operation (a read, a claim: not coalesced) now; await its future."""
        return self._submit(lambda: self._guarded(op))

    def batched(self, op: Callable[[Store], T]) -> asyncio.Future[T]:
        """Queue a write; every write queued before the next flush shares one transaction."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((op, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                ops = [op for op, _ in batch]
                try:
                    results = await self.call(functools.partial(Store.run_batch, ops=ops))
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:  # every caller of this batch sees the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._flusher = None

    def _submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        if self._executor is None:
            raise self._failure(f"sqlite database {self.path} is not open")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _open(self) -> None:
        try:
            self._store = Store(self.path, busy_timeout=self._busy_timeout)
        except sqlite3.Error as exc:
            raise self._unavailable(f"cannot open sqlite database {self.path}: {exc}") from exc

    def _shutdown(self, final: _Op | None) -> None:
        try:
            if final is not None and self._store is not None:
                self._guarded(final)
        finally:
            store, self._store = self._store, None
            if store is not None:
                store.close()

    def _guarded(self, op: Callable[[Store], T]) -> T:
        if self._store is None:
            raise self._failure(f"sqlite database {self.path} is closed")
        try:
            return op(self._store)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> ServeQueueError:
        kind = self._unavailable if isinstance(exc, sqlite3.OperationalError) else self._failure
        code = getattr(exc, "sqlite_errorname", None)
        detail = f"{exc} ({code})" if code else str(exc)
        return kind(f"sqlite database {self.path}: {detail}")


async def nap(event: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` is set or ``seconds`` pass, whichever comes first."""
    if event.is_set():
        return
    timer = asyncio.get_running_loop().call_later(seconds, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


class ReadyWatch:
    """Waits for task results to become ready: one query per tick covers every waiter.

    The tick starts at 5 ms after progress (or a ``poke()``, sent when this process stores a
    result) and backs off to ``poll_interval`` while nothing becomes ready.
    """

    def __init__(
        self,
        db: DatabaseThread,
        decode: Callable[[str, str], dict[str, Any]],
        poll_interval: float,
    ) -> None:
        self._db = db
        self._decode = decode  # (task_id, stored text) -> meta
        self._poll_interval = poll_interval
        self._waiters: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self._poke.set()

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        """The ready meta of ``task_id``; ``asyncio.TimeoutError`` after ``timeout``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiters.setdefault(task_id, set()).add(future)
        if self._task is None:
            self._task = loop.create_task(self._run())
        else:
            self.poke()  # look for the newcomer at once
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[task_id]

    async def _run(self) -> None:
        interval = _FAST_POLL_S
        try:
            while self._waiters:
                self._poke.clear()
                ids = list(self._waiters)
                try:
                    found = await self._db.call(
                        functools.partial(Store.ready_results, task_ids=ids)
                    )
                except Exception as exc:  # every current waiter learns of it
                    self._settle_all(exc)
                    return
                for task_id, text in found:
                    self._resolve(task_id, text)
                interval = _FAST_POLL_S if found else min(interval * 2, self._poll_interval)
                await nap(self._poke, interval)
        finally:
            self._task = None

    def _resolve(self, task_id: str, text: str) -> None:
        try:
            meta: dict[str, Any] | None = self._decode(task_id, text)
            error: BaseException | None = None
        except Exception as exc:
            meta, error = None, exc
        for future in self._waiters.get(task_id, ()):
            if future.done():
                continue
            if meta is not None:
                future.set_result(dict(meta))
            else:
                future.set_exception(error or RuntimeError("undecodable result"))

    def _settle_all(self, exc: Exception) -> None:
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
