"""Celery's ``rpc://`` result backend: task states travel as AMQP messages to the caller.

A worker publishes each state (STARTED, RETRY, SUCCESS, FAILURE, ...) of a task as the Celery
meta dict in kombu JSON to the default exchange, routing key = the task message's ``reply_to``
(the caller's queue), ``correlation_id`` = the task id, ``delivery_mode`` 1. The caller
declares its queue (durable, auto-delete, ``x-expires`` = ``result_expires``) and consumes it.

``RPCResultBackend`` plays both sides: ``store(task_id, meta, reply_to=...)`` publishes like a
Celery worker (a Celery client's ``AsyncResult.get()`` receives it), and ``get``/``wait`` read
the results sent to ``self.reply_to`` (put it in the ``reply_to`` of tasks you send).
As with Celery, a result is only delivered to a caller whose queue exists: results sent while
nobody listens are lost, and only the process owning ``reply_to`` can read them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from typing import Any

from aio_pika.abc import AbstractChannel
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from kombu.serialization import loads as kombu_loads
from kombu.utils import json as kombu_json

from serve_queue.adapters._amqp_link import AMQPLink, retry_delay, translated
from serve_queue.adapters._amqp_wire import WireProperties
from serve_queue.config import BrokerURL
from serve_queue.errors import BrokerError, BrokerUnavailable, ResultBackendError, TaskTimeout

__all__ = ["RPCResultBackend"]

log = logging.getLogger("serve_queue.adapters.rabbitmq")
_dumps: Callable[[Any], str] = kombu_json.dumps
_loads: Callable[..., Any] = kombu_loads
_READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


class RPCResultBackend:
    """``ResultBackend`` speaking Celery's ``rpc://`` protocol over an AMQP broker URL."""

    def __init__(
        self,
        url: str | BrokerURL,
        *,
        reply_to: str | None = None,
        result_expires: float | None = 86400.0,
        accept: Collection[str] = ("application/json",),
        max_results: int = 10_000,
        reconnect_window_s: float = 30.0,
    ) -> None:
        self._link = AMQPLink(url, connect_timeout=10.0, reconnect_window=reconnect_window_s)
        self.reply_to = reply_to or str(uuid.uuid4())
        self.result_expires = result_expires
        self._accept = set(accept)
        self._max_results = max_results
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._waiters: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}
        self._listener: tuple[AbstractChannel, RawChannel] | None = None
        self._listen_lock = asyncio.Lock()
        self._relisten: asyncio.Task[None] | None = None
        self._warned_no_reply_to = False

    def __repr__(self) -> str:
        return f"RPCResultBackend({str(self._link.url)!r}, reply_to={self.reply_to!r})"

    async def connect(self) -> None:
        """Connect, declare ``reply_to`` as Celery does and start receiving results on it."""
        self._link.closed = False
        try:
            await self._link.connection(patient=False)
            await self._listen()
        except BrokerError as exc:
            raise ResultBackendError(f"rpc backend: {exc}") from exc

    async def close(self) -> None:
        self._listener = None
        if self._relisten is not None:
            self._relisten.cancel()
            self._relisten = None
        await self._link.close()

    # -- the worker's side -----------------------------------------------------------------

    async def store(
        self, task_id: str, meta: Mapping[str, Any], *, reply_to: str | None = None
    ) -> None:
        """Send ``meta`` to the caller's queue ``reply_to`` (the task message's property)."""
        if not reply_to:
            if not self._warned_no_reply_to:
                self._warned_no_reply_to = True
                log.warning("rpc backend: task %s has no reply_to; its states go nowhere", task_id)
            return
        try:
            body = _dumps(dict(meta)).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ResultBackendError(f"task {task_id}: meta cannot be encoded: {exc}") from exc
        props = WireProperties(
            content_type="application/json",
            content_encoding="utf-8",
            headers={},
            delivery_mode=1,
            priority=0,
            correlation_id=task_id,
        )
        for attempt in range(3):  # a dead connection is replaced (the link waits for it)
            try:
                channel = await self._link.channel("confirm")
                with translated(f"send the result of {task_id} to {reply_to!r}"):
                    await channel.basic_publish(
                        body, exchange="", routing_key=reply_to, properties=props
                    )
                return
            except BrokerUnavailable as exc:
                if attempt == 2 or self._link.closed:
                    raise ResultBackendError(f"rpc backend: {exc}") from exc
            except BrokerError as exc:
                raise ResultBackendError(f"rpc backend: {exc}") from exc

    # -- the caller's side -----------------------------------------------------------------

    async def get(self, task_id: str) -> dict[str, Any] | None:
        await self._ensure_listening()
        meta = self._results.get(task_id)
        return None if meta is None else dict(meta)

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        await self._ensure_listening()
        meta = self._results.get(task_id)
        if meta is not None and meta.get("status") in _READY:
            return dict(meta)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise TaskTimeout(f"task {task_id}: no result within {timeout}s") from None
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[task_id]

    async def _ensure_listening(self) -> None:
        if self._listener is None or self._listener[1].is_closed:
            try:
                await self._listen()
            except BrokerError as exc:
                raise ResultBackendError(f"rpc backend: {exc}") from exc

    async def _listen(self) -> None:
        async with self._listen_lock:
            if self._listener is not None and not self._listener[1].is_closed:
                return
            channel, raw = await self._link.open_channel(confirms=False)
            args: dict[str, Any] = {}
            if self.result_expires is not None:
                args["x-expires"] = int(self.result_expires * 1000)
            with translated(f"listen on {self.reply_to!r}"):
                await raw.queue_declare(
                    self.reply_to, durable=True, auto_delete=True, arguments=args
                )
                await raw.basic_consume(self.reply_to, self._on_result, no_ack=True)
            self._listener = (channel, raw)
            raw.closing.add_done_callback(self._on_listener_closed)

    def _on_listener_closed(self, _: asyncio.Future[Any]) -> None:
        if not self._link.closed and (self._relisten is None or self._relisten.done()):
            self._relisten = asyncio.ensure_future(self._listen_again())

    async def _listen_again(self) -> None:
        """Listen again after a lost connection, so pending ``wait()`` calls still end."""
        attempt = 0
        while not self._link.closed:
            try:
                await self._listen()
                return
            except BrokerError as exc:
                log.warning("rpc backend: cannot listen on %r yet: %s", self.reply_to, exc)
            await asyncio.sleep(retry_delay(attempt))
            attempt += 1

    async def _on_result(self, message: DeliveredMessage) -> None:
        props = message.header.properties
        try:
            meta = _loads(
                message.body,
                props.content_type or "",
                props.content_encoding or "utf-8",
                accept=self._accept,
            )
        except Exception as exc:  # a bad reply must not stop the listener
            log.warning("rpc backend: dropping an undecodable result message: %s", exc)
            return
        task_id = props.correlation_id or (meta.get("task_id") if isinstance(meta, dict) else None)
        if not isinstance(meta, dict) or not isinstance(task_id, str):
            log.warning("rpc backend: dropping a result message that is not a task meta")
            return
        self._remember(task_id, meta)

    def _remember(self, task_id: str, meta: dict[str, Any]) -> None:
        current = self._results.get(task_id)
        if current is not None and current.get("status") in _READY:
            return  # never replace a final state (a late STARTED/RETRY)
        self._results[task_id] = meta
        self._results.move_to_end(task_id)
        while len(self._results) > self._max_results:
            self._results.popitem(last=False)
        if meta.get("status") in _READY:
            for waiter in self._waiters.pop(task_id, set()):
                if not waiter.done():
                    waiter.set_result(dict(meta))
