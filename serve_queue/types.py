"""The broker-neutral vocabulary every part of serve_queue agrees on.

Data flows one way::

    broker --adapter.deliveries()--> Delivery --protocol.decode--> TaskMessage
       --dispatcher--> executor --> handler --> Outcome --adapter.settle()--> broker
                                            \\--> results backend (state, result)

Adapters move envelopes (``Delivery`` in, ``OutgoingMessage`` out); they never interpret
task headers or bodies. Everything here is plain data or a ``typing.Protocol``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Ack",
    "BrokerAdapter",
    "DeadLetter",
    "Delivery",
    "Outcome",
    "OutgoingMessage",
    "QueueDepth",
    "Requeue",
    "ResultBackend",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message taken from a broker, not yet settled.

    ``body`` holds the serialized (possibly compressed) task bytes exactly as the producer wrote
    them, already unwrapped from any transport envelope (Redis/SQS base64 JSON envelope).
    ``token`` belongs to the adapter (delivery tag, receipt handle, unacked key): nothing but
    the adapter that produced the delivery may look inside it.

    When the adapter could not unwrap the transport envelope at all (a Redis list item that is
    not JSON, a body that is not base64, ...), it still yields a Delivery so that the consumer
    can dead-letter it and carry on: ``envelope_error`` says what was wrong and ``body`` holds
    the raw item as it was on the broker.
    """

    body: bytes
    content_type: str
    content_encoding: str
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    queue: str
    redelivered: bool
    token: Any = field(repr=False, compare=False)
    envelope_error: str | None = None


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to publish, in AMQP terms: body bytes plus headers and basic properties.

    ``properties`` uses AMQP's underscore names: ``correlation_id``, ``reply_to``,
    ``delivery_mode``, ``priority`` (0-9), ``expiration`` (milliseconds, as a string). Adapters
    map them onto their broker (the Redis/SQS JSON envelope, real AMQP properties).
    """

    body: bytes
    content_type: str = "application/json"
    content_encoding: str = "utf-8"
    headers: Mapping[str, Any] = field(default_factory=dict)
    properties: Mapping[str, Any] = field(default_factory=dict)

    @property
    def priority(self) -> int:
        """The message priority clamped to 0..9 (anything unparsable counts as 0)."""
        try:
            value = int(self.properties.get("priority") or 0)
        except (TypeError, ValueError):
            return 0
        return min(max(value, 0), 9)


@dataclass(frozen=True, slots=True)
class Ack:
    """Done with the message: remove it from the broker."""


@dataclass(frozen=True, slots=True)
class Requeue:
    """Give the message back to the broker, to be delivered again after ``delay_s`` seconds.

    The adapter must not hold the message unacknowledged in memory while it waits: it parks it
    on the broker (a delayed set, a TTL queue, a visibility change) and releases the delivery.
    """

    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Dead-letter the message: the original bytes and ``reason`` are kept, never dropped."""

    reason: str


Outcome = Ack | Requeue | DeadLetter


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """How much work a queue holds, for autoscaling.

    ``ready``: waiting to be delivered; ``reserved``: delivered and not yet settled (in flight,
    prefetched); ``delayed``: parked until a future time.

    ``oldest_age_s``: how long the oldest ready message has waited, in seconds, as well as the
    adapter can tell; ``None`` when it cannot or nothing is ready. What it measures depends
    on the broker:

    - SQLite, memory: exact, from the time the broker recorded the message;
    - Redis: the age of the next message of each priority list (peeked, ``LINDEX -1``) by the
      ``timestamp`` the serve_queue producer stamps in the envelope; for a head without one
      (Celery's producer, retries), a lower bound: how long this adapter has seen that item
      at the head (``None`` the first time);
    - RabbitMQ: an estimate from this adapter's own deliveries (AMQP cannot peek): now minus
      the later of the send time (AMQP ``timestamp``) of the newest message delivered here and
      the last time it saw the queue empty. An upper bound for stamped FIFO traffic; for
      unstamped messages, how long the queue has not moved for this consumer.
    """

    ready: int = 0
    reserved: int = 0
    delayed: int = 0
    oldest_age_s: float | None = None

    @property
    def total(self) -> int:
        return self.ready + self.reserved + self.delayed


@runtime_checkable
class BrokerAdapter(Protocol):
    """What the consumer and producer need from a broker. Async only, no shared state.

    Contract (proved for every adapter by ``tests/adapters/contract.py``):

    - ``deliveries(queues, prefetch)`` yields at most ``prefetch`` unsettled deliveries at a
      time; a message is never off the broker without being recorded as in flight, so a
      process killed at any instant loses nothing (the broker redelivers after the lease).
    - ``settle`` is called exactly once per delivery; ``DeadLetter`` keeps the original bytes and
      the reason in a dead-letter destination.
    - ``extend(delivery, seconds)`` renews the lease so a long task is not redelivered.
    - ``close()`` stops fetching and hands every unsettled delivery back to the broker at
      once, as redelivered; a later ``settle`` of such a delivery is a no-op.
    - client exceptions are translated into ``serve_queue.errors`` at the edge.
    """

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, queue: str, message: OutgoingMessage) -> None: ...

    def deliveries(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]: ...

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None: ...

    async def extend(self, delivery: Delivery, seconds: float) -> None: ...

    async def depth(self, queue: str) -> QueueDepth: ...


@runtime_checkable
class ResultBackend(Protocol):
    """Where task states and results live, as Celery's task meta dicts.

    ``meta`` is the decoded Celery meta: ``{"status", "result", "traceback", "children",
    "date_done", "task_id", ...}``. ``store`` never overwrites a stored ``SUCCESS``;
    ``reply_to`` is the task message's property, needed by Celery's ``rpc://`` backend, which
    sends results to the caller's own queue (key-value backends ignore it).
    ``get`` returns ``None`` for an unknown id (Celery's PENDING). ``wait`` returns the meta
    once the task is ready (SUCCESS, FAILURE, REVOKED) or raises ``TaskTimeout``.
    """

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def store(
        self, task_id: str, meta: Mapping[str, Any], *, reply_to: str | None = None
    ) -> None: ...

    async def get(self, task_id: str) -> dict[str, Any] | None: ...

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]: ...


def queue_list(queues: str | Sequence[str]) -> list[str]:
    """Normalise a queue name or a sequence of names into a list (``"a"`` -> ``["a"]``)."""
    return [queues] if isinstance(queues, str) else list(queues)
