"""RabbitMQ (AMQP 0-9-1) adapter on aio-pika, wire-compatible with Celery 5.7's ``amqp://``.

Topology is Celery's: for each queue ``q``, a durable queue ``q``, a durable direct exchange
``q`` and the binding ``q -> q`` with key ``q``, declared once per connection; messages are
published to the default exchange with routing key ``q`` (``bindings=`` describes Celery
``task_queues`` routed through topic/fanout exchanges). Queue arguments must equal what Celery
declared (``max_priority`` <-> ``task_queue_max_priority``, ``queue_arguments`` for the rest,
e.g. ``{"x-queue-type": "quorum"}``): RabbitMQ refuses a redeclare with other arguments
(PRECONDITION_FAILED), reported as ``ConfigurationError``.

Delivery: ``basic.qos`` prefetch = the consumer's ``prefetch`` (per consumer), late acks
coalesced per loop tick, ``Requeue()`` = ``basic.nack(requeue=True)``. ``Requeue(delay_s)``
publishes a copy (publisher confirm) to a delay queue ``serve_queue.delay.<q>.<2**k>s`` with a
per-message TTL, which dead-letters it back to ``q`` when it expires, then acks the original:
a crash in between duplicates the message, never loses it. Rung ``k`` takes delays up to
``2**k`` s, so a message waits behind others of its rung at most about its own delay (TTLs
only expire at a queue's head). ``DeadLetter(reason)`` publishes the original bytes with
``x-dead-letter-reason`` / ``x-dead-letter-queue`` headers to ``dead_letter_queue`` (through
``dead_letter_exchange``, default ``""``), declared by the adapter if ``declare_dead_letter``.

Leases: AMQP has none of its own: RabbitMQ redelivers an unacked message when the channel
or connection that holds it closes (a crashed consumer loses nothing), never after a time.
For the same contract as the other brokers, the adapter keeps a client-side lease: a handed-out
delivery neither settled nor renewed with ``extend()`` within ``visibility_timeout`` seconds is
given back (``basic.nack`` with requeue, so it is redelivered; a later settle is a no-op).
``visibility_timeout=None`` turns that off (pure AMQP semantics: held until settled).

RabbitMQ's own limit is ``consumer_timeout`` (default 30 min, since 3.8.15): it closes a
channel that holds a delivery unacked for longer, whatever ``extend()`` says; the adapter then
reopens it and the broker redelivers. A warning is logged once a delivery has been held for
80% of ``consumer_timeout_s`` (set it to the broker's value). Raise the broker's limit for long
tasks with ``consumer_timeout = 7200000`` (ms) in ``rabbitmq.conf``, per queue with a
``consumer-timeout`` policy (RabbitMQ >= 3.12), or, with ``request_consumer_timeout=True``,
for this adapter's consumers: they then ask for ``consumer_timeout_s`` with the
``x-consumer-timeout`` consumer argument (honoured from RabbitMQ 3.12; older brokers ignore it).

Connection loss: the adapter reconnects with backoff (up to ``reconnect_window_s`` per call
before raising ``BrokerUnavailable``), redeclares its topology and resumes consuming.
Deliveries of the dead channel were requeued by the broker; settling them is a no-op.

Depth: ``ready`` from a passive ``queue.declare``, ``delayed`` from the delay queues',
``reserved`` = this adapter's own unacked deliveries (AMQP cannot count other consumers'
without the management plugin; each replica reports what it runs, and ``BacklogPolicy`` adds
those up). ``oldest_age_s`` is an estimate from this adapter's own deliveries (AMQP cannot
peek at a queue's head): see ``_amqp_age``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiormq
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from serve_queue.adapters._amqp_age import DeliveryClock
from serve_queue.adapters._amqp_link import AMQPLink, translated
from serve_queue.adapters._amqp_rpc import RPCResultBackend
from serve_queue.adapters._amqp_session import ConsumeSession
from serve_queue.adapters._amqp_topology import QueueBinding, Topology
from serve_queue.adapters._amqp_wire import (
    DELAY_RUNGS,
    REASON_HEADER,
    SOURCE_HEADER,
    WireProperties,
    delay_queue,
    delay_rung,
    expiration_ms,
    incoming_properties,
    normalize,
    outgoing_properties,
)
from serve_queue.config import BrokerURL
from serve_queue.errors import BrokerError, BrokerUnavailable, ConfigurationError
from serve_queue.types import (
    Ack,
    DeadLetter,
    Delivery,
    Outcome,
    OutgoingMessage,
    QueueDepth,
    Requeue,
    queue_list,
)

__all__ = ["REASON_HEADER", "SOURCE_HEADER", "QueueBinding", "RPCResultBackend", "RabbitMQAdapter"]

log = logging.getLogger("serve_queue.adapters.rabbitmq")
_WARN_AT = 0.8  # of consumer_timeout_s


@dataclass(frozen=True, slots=True)
class _Token:
    session: ConsumeSession
    tag: int


class RabbitMQAdapter:
    """``BrokerAdapter`` for RabbitMQ (see the module docstring for the semantics)."""

    def __init__(
        self,
        url: str | BrokerURL,
        *,
        visibility_timeout: float | None = 60.0,
        dead_letter_queue: str = "{queue}.dlq",
        dead_letter_exchange: str = "",
        declare_dead_letter: bool = True,
        max_priority: int | None = None,
        queue_arguments: Mapping[str, Any] | None = None,
        bindings: Mapping[str, QueueBinding] | None = None,
        consumer_timeout_s: float = 1800.0,
        request_consumer_timeout: bool = False,
        publisher_confirms: bool = True,
        reconnect_window_s: float = 30.0,
    ) -> None:
        _check_options(dead_letter_queue, max_priority, consumer_timeout_s, reconnect_window_s)
        if visibility_timeout is not None and visibility_timeout <= 0:
            raise ConfigurationError("visibility_timeout must be positive (or None: no lease)")
        self.visibility_timeout = visibility_timeout
        self.consumer_timeout_s = consumer_timeout_s
        self._consume_args: dict[str, Any] | None = None
        if request_consumer_timeout:
            self._consume_args = {"x-consumer-timeout": round(consumer_timeout_s * 1000)}
        self.publisher_confirms = publisher_confirms
        self._link = AMQPLink(url, connect_timeout=10.0, reconnect_window=reconnect_window_s)
        args = dict(queue_arguments or {})
        if max_priority is not None:
            args["x-max-priority"] = max_priority
        self._topology = Topology(
            queue_arguments=args,
            bindings=bindings or {},
            dead_letter_queue=dead_letter_queue,
            dead_letter_exchange=dead_letter_exchange,
            declare_dead_letter=declare_dead_letter,
        )
        self._sessions: set[ConsumeSession] = set()
        self._clock = DeliveryClock()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RabbitMQAdapter({str(self._link.url)!r})"

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        self._closed = self._link.closed = False
        await self._link.connection(patient=False)

    async def close(self) -> None:
        """Stop; every unsettled delivery goes back to its queue now (the channels close)."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for session in self._sessions:
            session.abandon()  # later settles are no-ops: the broker requeues these
        self._sessions.clear()
        await self._link.close()

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, queue: str, message: OutgoingMessage) -> None:
        exchange, routing_key = self._topology.route(queue)
        props = outgoing_properties(message)
        await self._send(
            lambda ch: self._topology.queue(ch, queue, self._link.declared),
            exchange,
            routing_key,
            message.body,
            props,
            confirm=self.publisher_confirms,
            what=f"publish to {queue!r}",
        )

    async def _send(
        self,
        declare: Callable[[RawChannel], Awaitable[None]],
        exchange: str,
        routing_key: str,
        body: bytes,
        props: WireProperties,
        *,
        confirm: bool,
        what: str,
    ) -> None:
        """Publish, redone on a new connection if the old one dies before the broker confirms
        (a confirmed publish is never repeated; an unconfirmed one may be: at-least-once)."""
        for attempt in range(3):
            try:
                channel = await self._link.channel("confirm" if confirm else "plain")
                await declare(channel)
                with translated(what):
                    # with confirms, the confirm is what to wait for, not the socket write
                    result = await cast(aiormq.Channel, channel).basic_publish(
                        bytes(body), exchange=exchange, routing_key=routing_key, properties=props,
                        wait=not confirm,
                    )  # fmt: skip
            except BrokerUnavailable:
                if attempt == 2 or self._closed:
                    raise
                continue
            if isinstance(result, (Basic.Nack, Basic.Reject)):
                raise BrokerError(f"{what}: the broker refused the message ({result.name})")
            return

    # -- consuming -------------------------------------------------------------------------

    async def deliveries(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        names = queue_list(queues)
        if prefetch < 1 or not names:
            raise ConfigurationError("deliveries() needs at least one queue and prefetch >= 1")
        self._start_watchdog()
        while not self._closed:
            session = await self._open_session(names, prefetch)
            try:
                while (item := await session.next()) is not None:
                    yield self._delivery(session, *item)
            finally:
                await session.stop()
            if session.dead and not self._closed:
                _log_lost(session)

    async def _open_session(self, queues: list[str], prefetch: int) -> ConsumeSession:
        for attempt in range(3):
            try:
                channel, raw = await self._link.open_channel(confirms=False)
                for queue in queues:
                    await self._topology.queue(raw, queue, self._link.declared)
                session = ConsumeSession(
                    channel,
                    raw,
                    prefetch=prefetch,
                    lease=self.visibility_timeout,
                    generation=self._link.generation,
                )
                with translated(f"consume {queues}"):
                    await session.start(queues, self._consume_args)
            except BrokerUnavailable:
                if attempt == 2 or self._closed:
                    raise
                continue
            self._sessions = {s for s in self._sessions if not s.dead}
            self._sessions.add(session)
            return session
        raise AssertionError("unreachable")

    def _delivery(self, session: ConsumeSession, message: DeliveredMessage, queue: str) -> Delivery:
        props = message.header.properties
        tag = message.delivery_tag
        assert tag is not None  # sessions only hand out consumer deliveries
        # AMQP has no envelope to break; its unusable message is one without a content type
        # (a Celery worker crashes on it): flag it so it is dead-lettered as it is
        error = None if props.content_type else "AMQP message has no content_type"
        try:
            headers, properties = normalize(dict(props.headers or {})), incoming_properties(message)
        except Exception as exc:  # RecursionError, MemoryError too: quarantine the message
            headers, properties = {}, {}
            error = f"unreadable AMQP headers or properties ({type(exc).__name__})"
        self._clock.delivered(queue, props.timestamp, time.time())
        return Delivery(
            body=bytes(message.body),
            content_type=props.content_type or "",
            content_encoding=props.content_encoding or "",
            headers=headers,
            properties=properties,
            queue=queue,
            redelivered=bool(message.redelivered),
            token=_Token(session, tag),
            envelope_error=error,
        )

    # -- settling --------------------------------------------------------------------------

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        token = _token_of(delivery)
        session, tag = token.session, token.tag
        if not session.owns(tag):
            return  # its channel is gone (the broker requeued it) or it was settled already
        if isinstance(outcome, Ack):
            await session.ack(tag)
        elif isinstance(outcome, Requeue) and outcome.delay_s <= 0:
            await session.nack(tag)
        elif isinstance(outcome, Requeue):
            await self._park(delivery, outcome.delay_s)
            await session.ack(tag)
        elif isinstance(outcome, DeadLetter):
            await self._dead_letter(delivery, outcome.reason)
            await session.ack(tag)
        else:
            raise TypeError(f"not an outcome: {outcome!r}")

    async def _park(self, delivery: Delivery, delay_s: float) -> None:
        queue, rung = delivery.queue, delay_rung(delay_s)
        props = outgoing_properties(_copy(delivery), expiration=expiration_ms(delay_s), copy=True)
        await self._send(
            lambda ch: self._topology.delays(ch, queue, self._link.declared),
            "",
            delay_queue(queue, rung),
            delivery.body,
            props,
            confirm=True,
            what=f"delay a message of {queue!r}",
        )

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        queue = delivery.queue
        exchange, dlq = self._topology.dead_letter_route(queue)
        headers = {**delivery.headers, REASON_HEADER: reason, SOURCE_HEADER: queue}
        props = outgoing_properties(_copy(delivery), headers=headers, copy=True)
        props.delivery_mode = 2  # kept, whatever the original said
        await self._send(
            lambda ch: self._topology.dead_letter(ch, queue, self._link.declared),
            exchange,
            dlq,
            delivery.body,
            props,
            confirm=True,
            what=f"dead-letter to {dlq!r}",
        )

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """Renew the client-side lease (RabbitMQ's ``consumer_timeout`` still applies)."""
        token = _token_of(delivery)
        token.session.extend(token.tag, seconds)

    # -- depth -----------------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        ready = await self._count(queue) or 0
        delayed = 0
        if (first := await self._count(delay_queue(queue, 0))) is not None:
            delayed = first
            for rung in range(1, DELAY_RUNGS):
                delayed += await self._count(delay_queue(queue, rung)) or 0
        live = [s for s in self._sessions if not s.dead]
        reserved = sum(1 for s in live for held in s.held.values() if held.queue == queue)
        oldest = self._clock.oldest(queue, ready, time.time())
        return QueueDepth(ready=ready, reserved=reserved, delayed=delayed, oldest_age_s=oldest)

    async def _count(self, queue: str) -> int | None:
        """Messages ready in ``queue`` (passive declare), None if it does not exist."""
        for attempt in range(2):
            try:
                channel = await self._link.channel("probe")
                with translated(f"count {queue!r}"):
                    ok = await channel.queue_declare(queue, passive=True)
                return int(ok.message_count or 0)
            except BrokerUnavailable:
                if attempt == 1:
                    raise
            except BrokerError as exc:
                if isinstance(exc.__cause__, aiormq.exceptions.ChannelNotFoundEntity):
                    return None
                raise
        return None

    # -- leases and consumer_timeout --------------------------------------------------------

    def _start_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch_held())

    async def _watch_held(self) -> None:
        ticks = [1.0, self.consumer_timeout_s / 20]
        if self.visibility_timeout is not None:
            ticks.append(self.visibility_timeout / 8)
        tick = max(min(ticks), 0.02)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for session in [s for s in self._sessions if not s.dead]:
                await self._expire_leases(session, now)
                self._warn_consumer_timeout(session, now)

    async def _expire_leases(self, session: ConsumeSession, now: float) -> None:
        for tag in session.expired(now):
            held = session.held.get(tag)
            if held is None:
                continue  # settled meanwhile
            log.warning(
                "the lease of a delivery from %r ran out (neither settled nor extended within "
                "visibility_timeout=%ss): handing it back",
                held.queue,
                self.visibility_timeout,
            )
            await session.nack(tag)

    def _warn_consumer_timeout(self, session: ConsumeSession, now: float) -> None:
        limit = self.consumer_timeout_s * _WARN_AT
        for held in session.held.values():
            if not held.warned and now - held.received_at >= limit:
                held.warned = True
                log.warning(
                    "a delivery from %r has been unacknowledged for %.0fs, %d%% of "
                    "RabbitMQ's consumer_timeout (%.0fs, consumer_timeout_s): the "
                    "broker will then close the channel and redeliver it. Raise "
                    "consumer_timeout (ms) in rabbitmq.conf, or with a consumer-timeout "
                    "policy or request_consumer_timeout=True (RabbitMQ >= 3.12), and "
                    "consumer_timeout_s to match (see docs/rabbitmq.md).",
                    held.queue,
                    now - held.received_at,
                    _WARN_AT * 100,
                    self.consumer_timeout_s,
                )


def _check_options(
    dlq: str, max_priority: int | None, consumer_timeout: float, window: float
) -> None:
    try:
        dlq.format(queue="q")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigurationError(f"bad dead_letter_queue {dlq!r}: use {{queue}}") from exc
    if max_priority is not None and not 1 <= max_priority <= 255:
        raise ConfigurationError(f"max_priority must be within 1..255, got {max_priority}")
    if consumer_timeout <= 0 or window < 0:
        raise ConfigurationError("consumer_timeout_s must be positive, reconnect_window_s >= 0")


def _token_of(delivery: Delivery) -> _Token:
    if not isinstance(delivery.token, _Token):
        raise BrokerError("this delivery did not come from a RabbitMQAdapter")
    return delivery.token


def _copy(delivery: Delivery) -> OutgoingMessage:
    props = {k: v for k, v in delivery.properties.items() if k != "delivery_info"}
    headers = dict(delivery.headers)
    return OutgoingMessage(
        delivery.body, delivery.content_type, delivery.content_encoding, headers, props
    )


def _log_lost(session: ConsumeSession) -> None:
    reason = session.close_reason
    if reason is not None and "timed out" in str(reason):
        log.error(
            "RabbitMQ closed the channel because a delivery stayed unacknowledged longer than "
            "its consumer_timeout (%s); it will be redelivered. Raise consumer_timeout.",
            reason,
        )
    else:
        log.warning("lost the consuming channel (%s); reconnecting", reason or "closed")
