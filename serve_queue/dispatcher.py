"""One delivery, start to finish: decode, check, run, record the result, settle.

The order of events is the delivery promise of design.md §6:

- a chord header task is refused before anything runs (``serve_queue.canvas``: FAILURE stored,
  dead-lettered as ``chord-unsupported``, warned once per chord);
- a message that cannot be a task (undecodable, unknown name, arguments that do not bind or
  validate) is dead-lettered with its original bytes and a reason, counted and logged once;
  where Celery would write a FAILURE (unknown task, bad arguments) so do we, so a client
  waiting on ``get()`` gets an error rather than a hang;
- an expired message is acknowledged and REVOKED("expired") is stored;
- an ETA further away than ``max_hold_s`` is parked on the broker (``Requeue(delay)``) instead
  of being held unacknowledged in memory;
- with late acks (the default) the message is acknowledged only after the handler finished
  and its result was stored; if storing fails the message is requeued, not lost;
- ``Retry`` re-publishes the task the way Celery does and stores RETRY; ``Reject`` stores
  FAILURE and dead-letters; any other exception stores FAILURE and is acknowledged (or
  dead-lettered when ``acks_on_failure_or_timeout`` is off).
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from serve_queue import protocol, results
from serve_queue.canvas import CanvasGuard, Refusal
from serve_queue.config import ConsumerConfig
from serve_queue.errors import (
    EncodeError,
    InvalidArguments,
    MessageError,
    Reject,
    ResultBackendError,
    Retry,
    ServeQueueError,
    UnknownTask,
)
from serve_queue.executor import Executor, SoftTimeLimitExceeded, TimeLimitExceeded
from serve_queue.protocol import TaskMessage
from serve_queue.registry import Handler, Registry
from serve_queue.types import (
    Ack,
    BrokerAdapter,
    DeadLetter,
    Delivery,
    Outcome,
    Requeue,
    ResultBackend,
)

__all__ = ["Dispatcher", "Stats"]

log = logging.getLogger("serve_queue.dispatcher")

#: how long a message whose result could not be stored waits before it runs again
STORE_FAILURE_BACKOFF_S = 5.0


@dataclass
class Stats:
    """Counters of what happened to deliveries, for health, metrics and tests."""

    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    expired: int = 0
    delayed: int = 0
    requeued: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in vars(self).items() if k != "dead_lettered"}
        out["dead_lettered"] = dict(self.dead_lettered)
        return out


class Dispatcher:
    """Turns deliveries into handler calls and outcomes; settles each delivery exactly once."""

    def __init__(
        self,
        *,
        registry: Registry,
        executor: Executor,
        adapter: BrokerAdapter,
        backend: ResultBackend,
        config: ConsumerConfig,
        hostname: str,
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.adapter = adapter
        self.backend = backend
        self.config = config
        self.hostname = hostname
        self.origin = f"gen{os.getpid()}@{hostname.rpartition('@')[2]}"
        self.stats = Stats()
        self.canvas = CanvasGuard()
        #: results are off: skip building metas that would only be thrown away
        self._discard = isinstance(backend, results.NullResultBackend)

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery and settle it (unless early ack already did)."""
        self.stats.received += 1
        outcome = await self._process(delivery)
        if outcome is not None:
            await self._settle(delivery, outcome)

    async def _process(self, delivery: Delivery) -> Outcome | None:
        try:
            message = protocol.decode(
                delivery, self.config.accept_content, self.config.max_decompressed_bytes
            )
        except MessageError as exc:
            return self._dead_letter(delivery, "undecodable", exc)
        refusal = self.canvas.refusal(message)  # None unless the message carries a chord
        if refusal is not None:
            return await self._refuse(message, refusal)
        try:
            handler = self.registry.get(message.name)
        except UnknownTask as exc:
            await self._store_quietly(
                message, results.not_registered_meta(message.id, message.name)
            )
            return self._dead_letter(delivery, "unknown-task", exc, message)
        if message.expires is not None or message.eta is not None:
            now = datetime.now(timezone.utc)
            if message.expires is not None and message.expires <= now:
                self.stats.expired += 1
                await self._store_quietly(message, results.revoked_meta(message.id, "expired"))
                return Ack()
            if message.eta is not None and message.eta > now:
                wait = (message.eta - now).total_seconds()
                if wait > self.config.max_hold_s:
                    self.stats.delayed += 1
                    return Requeue(delay_s=wait)
                await asyncio.sleep(wait)
        try:
            args, kwargs = handler.validate(message.args, message.kwargs)
        except InvalidArguments as exc:
            meta = results.invalid_arguments_meta(message.id, str(exc), **_links(message))
            await self._store_quietly(message, meta)
            return self._dead_letter(delivery, "invalid-arguments", exc, message)
        return await self._run(delivery, message, handler, args, kwargs)

    async def _run(
        self,
        delivery: Delivery,
        message: TaskMessage,
        handler: Handler,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> Outcome | None:
        early = (handler.options.acks or self.config.acks) == "early"
        if early:
            await self._settle(delivery, Ack())
        ignore = message.ignore_result or handler.options.ignore_result or self._discard
        try:
            if self.config.track_started and not ignore:
                meta = results.started_meta(message.id, hostname=self.hostname, pid=os.getpid())
                await self.backend.store(message.id, meta, reply_to=_reply_to(message))
            outcome = await self._call(delivery, message, handler, args, kwargs, ignore)
        except ResultBackendError as exc:
            log.error("task %s: could not store its result, requeued: %s", message.id, exc)
            self.stats.requeued += 1
            outcome = Requeue(delay_s=STORE_FAILURE_BACKOFF_S)
        return None if early else outcome

    async def _call(
        self,
        delivery: Delivery,
        message: TaskMessage,
        handler: Handler,
        args: list[Any],
        kwargs: dict[str, Any],
        ignore: bool,
    ) -> Outcome:
        opts = handler.options
        try:
            value = await self.executor.run(
                handler.func,
                handler.is_async,
                args,
                kwargs,
                soft_time_limit=message.soft_time_limit or opts.soft_time_limit,
                time_limit=message.time_limit or opts.time_limit,
            )
        except Retry as retry:
            return await self._retry(delivery, message, handler, retry, ignore)
        except Reject as reject:
            self.stats.failed += 1
            await self._store(message, results.reject_meta(message.id, reject.reason), ignore)
            return self._dead_letter(delivery, "rejected", reject, message)
        except (TimeLimitExceeded, SoftTimeLimitExceeded) as exc:
            return await self._failed(delivery, message, handler, exc, ignore, timeout=True)
        except Exception as exc:
            return await self._failed(delivery, message, handler, exc, ignore, timeout=False)
        children = (
            await self._send_followups(delivery, message, value)
            if message.callbacks or message.chain
            else []
        )
        if not ignore:
            meta = results.success_meta(message.id, value, children=children, **_links(message))
            await self.backend.store(message.id, meta, reply_to=_reply_to(message))
        self.stats.succeeded += 1
        return Ack()

    async def _failed(
        self,
        delivery: Delivery,
        message: TaskMessage,
        handler: Handler,
        exc: BaseException,
        ignore: bool,
        *,
        timeout: bool,
    ) -> Outcome:
        self.stats.failed += 1
        if message.errbacks:
            log.warning(
                "task %s: link_error callbacks are not supported yet and were not run: %s",
                message.id,
                ", ".join(str(sig.get("task")) for sig in message.errbacks),
            )
        if isinstance(exc, TimeLimitExceeded):
            meta = results.time_limit_meta(message.id, exc.limit, **_links(message))
        elif isinstance(exc, SoftTimeLimitExceeded):
            meta = results.soft_time_limit_meta(
                message.id, traceback.format_exc(), **_links(message)
            )
        else:
            meta = results.failure_meta(
                message.id, exc, traceback=traceback.format_exc(), **_links(message)
            )
        log.info("task %s (%s) failed: %r", message.id, message.name, exc)
        await self._store(
            message, meta, ignore=ignore and not self.config.store_errors_even_if_ignored
        )
        ack = handler.options.acks_on_failure_or_timeout
        if ack is None:
            ack = self.config.acks_on_failure_or_timeout
        if ack:
            return Ack()
        if timeout:
            return Requeue()
        return self._dead_letter(delivery, "failed", exc, message)

    async def _retry(
        self,
        delivery: Delivery,
        message: TaskMessage,
        handler: Handler,
        retry: Retry,
        ignore: bool,
    ) -> Outcome:
        limit = handler.options.max_retries
        if limit is not None and message.retries >= limit:
            exc = retry.exc or results.max_retries_exceeded(message.name, message.id, limit)
            return await self._failed(delivery, message, handler, exc, ignore, timeout=False)
        delay = retry.delay_s if retry.delay_s is not None else handler.options.default_retry_delay
        eta = datetime.now(timezone.utc) + timedelta(seconds=delay)
        try:
            retry_message = protocol.encode_retry(message, eta=eta)
        except EncodeError as exc:
            return await self._failed(delivery, message, handler, exc, ignore, timeout=False)
        await self.adapter.publish(delivery.queue, retry_message)
        tb = traceback.format_exc()
        await self._store(
            message, results.retry_meta(message.id, retry.exc or retry, traceback=tb), ignore
        )
        self.stats.retried += 1
        return Ack()

    async def _send_followups(
        self, delivery: Delivery, message: TaskMessage, value: Any
    ) -> list[Any]:
        """Publish link callbacks and the next chain step; return them as result children."""
        children: list[Any] = []
        chain = list(message.chain or [])
        pending: list[tuple[dict[str, Any], list[dict[str, Any]] | None]]
        pending = [(sig, None) for sig in message.callbacks or []]
        if chain:
            pending.append((chain[-1], chain[:-1]))
        for signature, rest in pending:
            try:
                queue, outgoing = protocol.encode_followup(
                    signature, message, value, origin=self.origin, chain=rest
                )
            except EncodeError as exc:  # the task itself succeeded: keep that, skip the link
                log.warning(
                    "task %s: cannot send follow-up %r: %s", message.id, signature.get("task"), exc
                )
                continue
            await self.adapter.publish(queue or delivery.queue, outgoing)
            children.append([[outgoing.headers["id"], None], None])
        return children

    async def _refuse(self, message: TaskMessage, refusal: Refusal) -> DeadLetter:
        """Store the refusal's FAILUREs and dead-letter the message (canvas logged it)."""
        for task_id, meta in refusal.failures:
            await self._store_quietly(message, meta, task_id=task_id)
        self.stats.dead_lettered[refusal.kind] += 1
        return DeadLetter(reason=f"{refusal.kind}: {refusal.error}")

    async def _store(self, message: TaskMessage, meta: Mapping[str, Any], ignore: bool) -> None:
        if not ignore:
            await self.backend.store(message.id, meta, reply_to=_reply_to(message))

    async def _store_quietly(
        self, message: TaskMessage, meta: Mapping[str, Any], *, task_id: str | None = None
    ) -> None:
        """Store a meta (for ``task_id``, default the message's) for a message that is being
        discarded; a failure only logs."""
        if message.ignore_result:
            return
        task_id = task_id or message.id
        try:
            await self.backend.store(task_id, meta, reply_to=_reply_to(message))
        except ServeQueueError as exc:
            log.warning("task %s: could not store %s: %s", task_id, meta.get("status"), exc)

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        try:
            await self.adapter.settle(delivery, outcome)
        except ServeQueueError as exc:
            # the lease will run out and the broker redelivers: at-least-once holds
            log.warning(
                "could not settle a delivery from %s (%s): %s", delivery.queue, outcome, exc
            )

    def _dead_letter(
        self,
        delivery: Delivery,
        kind: str,
        exc: BaseException,
        message: TaskMessage | None = None,
    ) -> DeadLetter:
        self.stats.dead_lettered[kind] += 1
        who = (
            f"task {message.id} ({message.name})" if message else f"a message on {delivery.queue!r}"
        )
        log.warning("dead-lettering %s: %s: %s", who, kind, exc)
        return DeadLetter(reason=f"{kind}: {exc}")


def _reply_to(message: TaskMessage) -> str | None:
    """Where an ``rpc://`` backend sends this task's states (the caller's queue)."""
    return message.properties.get("reply_to") or None


def _links(message: TaskMessage) -> dict[str, Any]:
    return {"parent_id": message.parent_id, "group_id": message.group_id}
