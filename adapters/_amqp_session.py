"""One consuming channel: its deliveries, the prefetch bound, and coalesced acknowledgements.

Delivery tags are per channel, so a session is the unit a delivery belongs to. When the
channel dies (connection lost, channel closed by the broker) the broker requeues everything
that was unacked on it; the session is then ``dead`` and settling any of its deliveries is a
no-op, so nothing from a dead channel is ever settled twice (or on the wrong channel).

Settles have one owner per channel: ``ack`` and ``nack`` only record a decision in the
session's ``SettleLedger`` (``_amqp_settle``) and wait; a single writer task turns the decisions
of one loop tick into frames (one ``basic.ack(multiple=True)`` for the lowest outstanding tags
when they are all acked, single frames for the rest) and sends them before it plans the next
batch, so no frame ever names a tag that an earlier frame already settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aio_pika.abc import AbstractChannel
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from serve_queue.adapters._amqp_link import QUIET
from serve_queue.adapters._amqp_settle import Frame, SettleLedger

__all__ = ["ConsumeSession", "Held"]

log = logging.getLogger("serve_queue.adapters.rabbitmq")


@dataclass(slots=True)
class Held:
    """A delivery the broker counts as unacked on this channel."""

    queue: str
    received_at: float
    lease_until: float | None = None  # set when handed out (None: no lease, or still buffered)
    warned: bool = field(default=False)


class ConsumeSession:
    """Consumes ``queues`` on one channel; at most ``prefetch`` deliveries handed out unsettled.

    ``lease``: seconds a handed-out delivery may stay unsettled and not extended before
    ``expired()`` reports it (None: never).
    """

    def __init__(
        self,
        channel: AbstractChannel,
        raw: RawChannel,
        *,
        prefetch: int,
        lease: float | None,
        generation: int,
    ) -> None:
        self.generation = generation
        self.prefetch = prefetch
        self.lease = lease
        self.held: dict[int, Held] = {}  # unacked on the broker: buffered or handed out
        self.dead = False
        self.close_reason: BaseException | None = None
        self._channel = channel  # keeps aio-pika's wrapper (and so the channel) alive
        self._raw = raw
        self._buffer: deque[DeliveredMessage] = deque()
        self._out: set[int] = set()  # handed out, not settled
        self._ledger = SettleLedger()  # what the broker still counts as unacked on the channel
        self._batch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writer: asyncio.Task[None] | None = None  # the one sender of settle frames
        self._changed = asyncio.Event()
        self._stopping = False
        self._queues: dict[str, str] = {}  # consumer tag -> queue
        raw.closing.add_done_callback(self._on_closed)

    def __repr__(self) -> str:
        state = "dead" if self.dead else "live"
        return f"ConsumeSession(#{self.generation}, {state}, held={len(self.held)})"

    async def start(self, queues: Sequence[str], arguments: dict[str, Any] | None = None) -> None:
        """Set the prefetch and consume ``queues`` (``arguments``: basic.consume's)."""
        await self._raw.basic_qos(prefetch_count=self.prefetch)
        for queue in queues:
            consumer_tag = f"serve_queue.{uuid.uuid4().hex[:12]}"
            self._queues[consumer_tag] = queue  # before: deliveries may beat the ConsumeOk
            await self._raw.basic_consume(
                queue, self._on_message, no_ack=False, consumer_tag=consumer_tag,
                arguments=arguments,
            )  # fmt: skip

    async def _on_message(self, message: DeliveredMessage) -> None:
        tag = message.delivery_tag
        if self.dead or tag is None:
            return
        queue = self._queues.get(message.consumer_tag or "", message.routing_key or "")
        self.held[tag] = Held(queue, time.monotonic())
        self._ledger.delivered(tag)
        self._buffer.append(message)
        self._changed.set()

    def _on_closed(self, closing: asyncio.Future[object]) -> None:
        self.dead = True
        if not closing.cancelled():
            self.close_reason = closing.exception()
        self._changed.set()
        self._release_waiters()

    async def next(self) -> tuple[DeliveredMessage, str] | None:
        """The next delivery once fewer than ``prefetch`` are out; None when the session ends."""
        while not (self.dead or self._stopping):
            if self._buffer and len(self._out) < self.prefetch:
                message = self._buffer.popleft()
                tag = message.delivery_tag
                if tag is None or tag not in self.held:
                    continue
                self._out.add(tag)
                held = self.held[tag]
                if self.lease is not None:
                    held.lease_until = time.monotonic() + self.lease
                return message, held.queue
            self._changed.clear()
            await self._changed.wait()
        return None

    def owns(self, tag: int) -> bool:
        """Whether ``tag`` can still be settled on this (live) channel."""
        return not self.dead and tag in self.held

    def extend(self, tag: int, seconds: float) -> None:
        """Renew the lease of a handed-out delivery: it now ends ``seconds`` from now."""
        held = self.held.get(tag)
        if held is not None and held.lease_until is not None and not self.dead:
            held.lease_until = time.monotonic() + seconds

    def expired(self, now: float) -> list[int]:
        """Handed-out deliveries whose lease ended before ``now``."""
        return [
            tag for tag, held in self.held.items()
            if held.lease_until is not None and held.lease_until <= now
        ]  # fmt: skip

    def _take(self, tag: int) -> bool:
        if self.held.pop(tag, None) is None or self.dead:
            return False
        if tag in self._out:
            self._out.discard(tag)
            self._changed.set()
        return True

    async def ack(self, tag: int) -> None:
        """Acknowledge ``tag`` (with the others of this tick); a no-op once the channel is
        dead. Returns once the frame that settles it was written."""
        await self._settle(tag, "ack")

    async def nack(self, tag: int) -> None:
        """Return ``tag`` to its queue now (``basic.nack`` with requeue), marked redelivered."""
        await self._settle(tag, "nack")

    async def _settle(self, tag: int, kind: Literal["ack", "nack"]) -> None:
        if not self._take(tag) or not self._ledger.decide(tag, kind):
            return
        batch = self._batch
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        await asyncio.shield(batch)
        await self._retire()

    async def _write(self) -> None:
        """The channel's only sender of settle frames: plans the decisions made so far, sends
        the plan's frames in order, and only then plans the next batch."""
        await asyncio.sleep(0)  # let the other settles of this tick join in
        while self._ledger.pending and not self.dead:
            batch, self._batch = self._batch, asyncio.get_running_loop().create_future()
            frames = self._ledger.plan()
            try:
                await self._send(frames)
            except QUIET as exc:  # the channel is gone: the broker requeues those messages
                log.info("could not settle %d deliveries (channel lost): %s", len(frames), exc)
            finally:
                if not batch.done():
                    batch.set_result(None)
        self._release_waiters()  # dead: nothing more is sent on this channel

    async def _send(self, frames: list[Frame]) -> None:
        """Queue every frame on the channel in order; wait for the socket after the last."""
        for i, frame in enumerate(frames):
            wait = i == len(frames) - 1
            if frame.kind == "ack":
                await self._raw.basic_ack(frame.tag, multiple=frame.multiple, wait=wait)
            else:
                await self._raw.basic_nack(frame.tag, requeue=True, wait=wait)

    def _release_waiters(self) -> None:
        """Once the channel is dead, wake the settles waiting on a batch no one will send."""
        if self.dead and not self._batch.done():
            self._batch.set_result(None)

    async def _retire(self) -> None:
        """Close the channel of a stopped session once nothing on it is left to settle."""
        idle = self._writer is None or self._writer.done()  # every decided frame was sent
        if self._stopping and not self.held and not self.dead and idle:
            await self.close()

    async def stop(self) -> None:
        """Stop consuming; hand back what was received but never handed out. Handed-out
        deliveries stay settleable until the channel is closed."""
        self._stopping = True
        self._changed.set()
        if self.dead:
            return
        with contextlib.suppress(*QUIET):
            for consumer_tag in list(self._queues):
                await self._raw.basic_cancel(consumer_tag)
        buffered = [m.delivery_tag for m in self._buffer if m.delivery_tag is not None]
        self._buffer.clear()
        await asyncio.gather(*(self.nack(tag) for tag in buffered))
        await self._retire()

    def abandon(self) -> None:
        """Settle nothing more on this channel (it is about to close); wake the iterator."""
        self.dead = True
        self._changed.set()
        self._release_waiters()

    async def close(self) -> None:
        """Close the channel: the broker requeues whatever is still unacked on it."""
        self.abandon()
        with contextlib.suppress(*QUIET):
            await self._channel.close()
