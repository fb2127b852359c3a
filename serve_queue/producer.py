"""Sending tasks and reading their results, from any async code.

``Producer.send_task`` builds a Celery protocol v2 message (so a Celery worker or ours can run
it), publishes it with a bounded retry on a dropped connection, and returns an ``AsyncResult``
whose ``state()`` and ``get()`` read the result backend the way Celery's ``AsyncResult`` does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from datetime import datetime
from typing import Any

from serve_queue import protocol, results
from serve_queue.config import RetryPolicy
from serve_queue.errors import BrokerUnavailable, ConfigurationError
from serve_queue.protocol import SendOptions
from serve_queue.types import BrokerAdapter, OutgoingMessage, ResultBackend

__all__ = ["AsyncResult", "Producer"]

log = logging.getLogger("serve_queue.producer")

_OPTION_NAMES = frozenset(f.name for f in fields(SendOptions))


class AsyncResult:
    """A handle on a sent task: its id, its state, and (awaitably) its result."""

    __slots__ = ("_backend", "id")

    def __init__(self, task_id: str, backend: ResultBackend) -> None:
        self.id = task_id
        self._backend = backend

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    async def meta(self) -> dict[str, Any] | None:
        """The stored task meta (Celery's format), or None while nothing is stored."""
        return await self._backend.get(self.id)

    async def state(self) -> str:
        """``PENDING`` until something is stored, then ``STARTED``/``RETRY``/``SUCCESS``/..."""
        meta = await self.meta()
        return str(meta["status"]) if meta else results.PENDING

    async def ready(self) -> bool:
        return await self.state() in results.READY_STATES

    async def get(self, timeout: float | None = None) -> Any:
        """Wait for the task to finish and return its value.

        Raises ``TaskFailed`` (carrying the remote exception's type, module, message and
        traceback) on FAILURE, ``TaskRevoked`` on REVOKED, ``TaskTimeout`` after ``timeout``.
        """
        meta = await self._backend.wait(self.id, timeout)
        if meta.get("status") == results.SUCCESS:
            return meta.get("result")
        raise results.exception_from_meta(self.id, meta)


class Producer:
    """Publishes tasks on one adapter; results are read from ``backend``."""

    def __init__(
        self,
        adapter: BrokerAdapter,
        backend: ResultBackend,
        *,
        default_queue: str = "celery",
        serializer: str = "json",
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.adapter = adapter
        self.backend = backend
        self.default_queue = default_queue
        self.serializer = serializer
        self.retry_policy = retry_policy or RetryPolicy()
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        reply_to = getattr(backend, "reply_to", None)
        #: where rpc:// results come back: this producer's own reply queue (else Celery's none)
        self._reply_to = reply_to if isinstance(reply_to, str) else None
        #: what a send with no options uses (SendOptions is immutable: one serves every call)
        self._defaults = SendOptions(serializer=serializer, reply_to=self._reply_to)
        self._delays = self.retry_policy.delays()
        self._connected = False
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._lock:
            if not self._connected:
                await self.adapter.connect()
                await self.backend.connect()
                self._connected = True

    async def close(self) -> None:
        async with self._lock:
            if self._connected:
                self._connected = False
                await self.adapter.close()
                await self.backend.close()

    async def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        priority: int | None = None,
        headers: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Publish task ``name`` and return its ``AsyncResult`` at once.

        ``countdown`` becomes an ``eta``; ``expires`` (seconds or a datetime) also sets the
        message TTL. Further Celery options: ``task_id``, ``serializer``, ``compression``,
        ``ignore_result``, ``time_limit``, ``soft_time_limit``, ``link`` (signature dicts run
        on success), ``link_error``, ``shadow``.
        """
        if options or countdown or eta or expires is not None or priority or headers:
            send = self._options(countdown, eta, expires, priority, headers, options)
        else:  # the common call: nothing but name and arguments
            send = self._defaults
        message = protocol.encode_task(
            name, list(args or ()), dict(kwargs or {}), send, origin=self.origin
        )
        if not self._connected:
            await self.connect()
        await self._publish(queue or self.default_queue, _stamped(message))
        return AsyncResult(str(message.headers["id"]), self.backend)

    def _options(
        self,
        countdown: float | None,
        eta: datetime | None,
        expires: float | datetime | None,
        priority: int | None,
        headers: Mapping[str, Any] | None,
        options: dict[str, Any],
    ) -> SendOptions:
        link = options.pop("link", None)
        link_error = options.pop("link_error", None)
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise ConfigurationError(f"unknown send_task option(s): {', '.join(sorted(unknown))}")
        options.setdefault("serializer", self.serializer)
        options.setdefault("reply_to", self._reply_to)
        return SendOptions(
            countdown=countdown,
            eta=eta,
            expires=expires,
            priority=priority,
            headers=headers,
            callbacks=_signatures(link),
            errbacks=_signatures(link_error),
            **options,
        )

    def result(self, task_id: str) -> AsyncResult:
        """A handle on a task sent earlier (by us, Celery, or anyone)."""
        return AsyncResult(task_id, self.backend)

    async def _publish(self, queue: str, message: Any) -> None:
        delays = self._delays
        for attempt in range(len(delays) + 1):
            try:
                await self.adapter.publish(queue, message)
                return
            except BrokerUnavailable as exc:
                if attempt == len(delays):
                    raise
                log.warning(
                    "publish to %r failed (attempt %d), retrying: %s", queue, attempt + 1, exc
                )
                await asyncio.sleep(delays[attempt])


def _stamped(message: OutgoingMessage) -> OutgoingMessage:
    """``message`` with its send time as the ``timestamp`` property (epoch seconds), which
    autoscaling reads as the age of waiting messages: the AMQP ``timestamp`` property on
    RabbitMQ (whole seconds), a property of the kombu envelope on Redis. Celery and kombu
    carry it and ignore it; Celery's own producer sets none."""
    if "timestamp" in message.properties:
        return message
    return replace(message, properties={**message.properties, "timestamp": time.time()})


def _signatures(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, Mapping) else list(value)
    return [dict(item) for item in items]
