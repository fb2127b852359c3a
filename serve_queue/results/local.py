"""Result backends that need no server: in memory (tests) and none (results off)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from serve_queue.errors import ConfigurationError, TaskTimeout
from serve_queue.results.meta import SUCCESS, decode_meta, encode_meta, is_ready

__all__ = ["MemoryResultBackend", "NullResultBackend"]


class MemoryResultBackend:
    """Keeps metas in this process, encoded exactly as the Redis backend stores them.

    Storing goes through kombu JSON, so a value the Redis backend could not store fails here
    the same way, and what ``get`` returns is what a real backend would return. A stored
    SUCCESS is never overwritten. For unit tests, and for users' tests of their handlers.
    """

    def __init__(self) -> None:
        self._payloads: dict[str, str] = {}
        self._waiters: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}

    def __repr__(self) -> str:
        return f"MemoryResultBackend({len(self._payloads)} results)"

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def store(
        self, task_id: str, meta: Mapping[str, Any], *, reply_to: str | None = None
    ) -> None:
        payload = encode_meta(task_id, meta)
        current = self._payloads.get(task_id)
        if current is not None and decode_meta(current).get("status") == SUCCESS:
            return
        self._payloads[task_id] = payload
        decoded = decode_meta(payload)
        if is_ready(decoded.get("status")):
            for waiter in self._waiters.pop(task_id, set()):
                if not waiter.done():
                    waiter.set_result(decode_meta(payload))

    async def get(self, task_id: str) -> dict[str, Any] | None:
        payload = self._payloads.get(task_id)
        return None if payload is None else decode_meta(payload)

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        meta = await self.get(task_id)
        if meta is not None and is_ready(meta.get("status")):
            return meta
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise TaskTimeout(f"task {task_id} was not ready after {timeout}s") from None
        finally:
            waiting = self._waiters.get(task_id)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._waiters[task_id]

    def keys(self) -> list[str]:
        """The task ids with a stored meta (for tests)."""
        return list(self._payloads)


class NullResultBackend:
    """Stores nothing: every task looks PENDING; waiting for a result is a usage error."""

    def __repr__(self) -> str:
        return "NullResultBackend()"

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def store(
        self, task_id: str, meta: Mapping[str, Any], *, reply_to: str | None = None
    ) -> None:
        return None

    async def get(self, task_id: str) -> dict[str, Any] | None:
        return None

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        raise ConfigurationError(
            f"cannot wait for task {task_id}: no result backend is configured "
            "(give a results URL such as redis://host:6379/1)"
        )
