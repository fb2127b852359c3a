"""An in-process broker and its adapter, for unit tests and users' own tests.

``MemoryBroker`` plays the server: named queues, leases with a visibility timeout, delayed
messages, dead-letter queues, and fault injection (``broker.faults``, see ``MemoryFaults``).
``MemoryAdapter`` is a full ``BrokerAdapter`` over one broker. No I/O, no threads: everything
runs on the event loop that calls it (use one broker from one event loop at a time).

There is no registry of brokers by URL name (serve_queue keeps no module-level mutable state):
``MemoryAdapter("memory://name")`` creates a private broker, and adapters share queues only
when they are given the same ``broker=``::

    broker = MemoryBroker()
    producer = MemoryAdapter(broker=broker)
    consumer = broker.adapter(visibility_timeout=5.0)

Ordering: higher ``priority`` is served first (AMQP's meaning; kombu's Redis transport serves
*lower* numbers first), first in first out within one priority. Messages handed back by
``close()`` or by an expired lease go to the front; ``Requeue`` goes to the back.
Headers and properties are deep-copied on publish and on delivery, as a real broker would
serialize them. ``expiration`` is carried, not enforced.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from serve_queue.adapters._memory_faults import MemoryFaults
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

__all__ = ["DeadLettered", "MemoryAdapter", "MemoryBroker", "MemoryFaults"]

#: header names under which a dead-lettered message keeps its reason and its source queue
REASON_HEADER = "x-dead-letter-reason"
SOURCE_HEADER = "x-dead-letter-queue"


@dataclass(frozen=True, slots=True)
class _Record:
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    priority: int
    enqueued_at: float
    redelivered: bool = False
    envelope_error: str | None = None


@dataclass(slots=True)
class _Lease:
    lease_id: int
    queue: str
    record: _Record
    deadline: float


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """One message in a memory dead-letter queue: the original bytes and why it is there."""

    body: bytes
    reason: str
    queue: str
    headers: dict[str, Any]


class MemoryBroker:
    """The in-process "server" shared by every ``MemoryAdapter`` given it as ``broker=``."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.faults = MemoryFaults(self)
        self._ready: dict[str, list[tuple[int, int, _Record]]] = {}
        self._delayed: list[tuple[float, int, str, _Record]] = []
        self._leases: dict[int, _Lease] = {}
        self._expiry: list[tuple[float, int]] = []
        self._back = itertools.count()
        self._front = itertools.count(-1, -1)
        self._lease_ids = itertools.count(1)
        self._waiters: set[asyncio.Future[None]] = set()
        self._timer: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle, float] | None = None

    def __repr__(self) -> str:
        return f"MemoryBroker({self.name!r})"

    def adapter(self, **options: Any) -> MemoryAdapter:
        """A new, not yet connected adapter on this broker (``options`` as for the adapter)."""
        return MemoryAdapter(f"memory://{self.name}", broker=self, **options)

    def depth(self, queue: str) -> QueueDepth:
        """Ready, reserved (leased to any adapter) and delayed counts of ``queue``, right now."""
        now = self._tick()
        ready = self._ready.get(queue, [])
        oldest = min((rec.enqueued_at for _, _, rec in ready), default=None)
        return QueueDepth(
            ready=len(ready),
            reserved=sum(1 for lease in self._leases.values() if lease.queue == queue),
            delayed=sum(1 for entry in self._delayed if entry[2] == queue),
            oldest_age_s=None if oldest is None else max(now - oldest, 0.0),
        )

    def dead_letters(self, dead_letter_queue: str) -> list[DeadLettered]:
        """The messages waiting in a dead-letter queue (e.g. ``"celery.dlq"``), oldest first."""
        self._tick()
        entries = sorted(self._ready.get(dead_letter_queue, []), key=lambda e: e[:2])
        return [
            DeadLettered(
                body=rec.body,
                reason=str(rec.headers.get(REASON_HEADER, "")),
                queue=str(rec.headers.get(SOURCE_HEADER, "")),
                headers=copy.deepcopy(rec.headers),
            )
            for _, _, rec in entries
        ]

    # -- the adapter's side ---------------------------------------------------------------

    def _publish(self, queue: str, message: OutgoingMessage) -> None:
        record = _Record(
            body=bytes(message.body),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=copy.deepcopy(dict(message.headers)),
            properties=copy.deepcopy(dict(message.properties)),
            priority=message.priority,
            enqueued_at=time.monotonic(),
        )
        self._push(queue, record, front=False)

    def _push_malformed(self, queue: str, raw: bytes, error: str) -> None:
        record = _Record(
            body=bytes(raw),
            content_type="application/octet-stream",
            content_encoding="binary",
            headers={},
            properties={},
            priority=0,
            enqueued_at=time.monotonic(),
            envelope_error=error,
        )
        self._push(queue, record, front=False)

    def _push(self, queue: str, record: _Record, *, front: bool) -> None:
        seq = next(self._front) if front else next(self._back)
        heapq.heappush(self._ready.setdefault(queue, []), (-record.priority, seq, record))
        self._notify()

    def _take(self, queues: Sequence[str], visibility_timeout: float) -> _Lease | None:
        """Lease the next ready message of the first non-empty queue in ``queues``."""
        now = self._tick()
        for queue in queues:
            ready = self._ready.get(queue)
            if ready:
                record = heapq.heappop(ready)[2]
                if self.faults._take_duplicate():
                    self._push(queue, replace(record, redelivered=True), front=True)
                lease = _Lease(next(self._lease_ids), queue, record, now + visibility_timeout)
                self._leases[lease.lease_id] = lease
                self._schedule_expiry(lease)
                return lease
        return None

    def _settle(self, lease_id: int, outcome: Outcome, dead_letter_queue: str) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:  # the lease expired and the message was handed to someone else
            return
        record = replace(lease.record, redelivered=True)
        match outcome:
            case Ack():
                pass
            case Requeue(delay_s=delay) if delay > 0:
                due = time.monotonic() + delay
                heapq.heappush(self._delayed, (due, next(self._back), lease.queue, record))
                self._arm_timer()
            case Requeue():
                self._push(lease.queue, record, front=False)
            case DeadLetter(reason=reason):
                headers = {**record.headers, REASON_HEADER: reason, SOURCE_HEADER: lease.queue}
                dead = replace(
                    record, headers=headers, priority=0, redelivered=False, envelope_error=None
                )
                self._push(dead_letter_queue.format(queue=lease.queue), dead, front=False)
            case _:
                raise TypeError(f"not an Outcome: {outcome!r}")
        self._notify()

    def _extend(self, lease_id: int, seconds: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.deadline = time.monotonic() + seconds
            self._schedule_expiry(lease)

    def _release(self, lease_ids: Sequence[int]) -> int:
        """Hand leased messages back to the front of their queues, keeping their order."""
        released = 0
        for lease_id in reversed(lease_ids):
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._push(lease.queue, replace(lease.record, redelivered=True), front=True)
                released += 1
        return released

    async def _wait(self) -> None:
        """Sleep until something changes: a publish, a settle, a lease expiry, a fault."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- time: leases and delays move lazily, and a single timer wakes the waiters ----------

    def _tick(self) -> float:
        """Return expired leases to their queues and due delayed messages; the current time."""
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            deadline, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.deadline == deadline:
                self._release([lease_id])
        while self._delayed and self._delayed[0][0] <= now:
            _, _, queue, record = heapq.heappop(self._delayed)
            self._push(queue, record, front=False)
        return now

    def _schedule_expiry(self, lease: _Lease) -> None:
        heapq.heappush(self._expiry, (lease.deadline, lease.lease_id))
        if len(self._expiry) > 2 * len(self._leases) + 64:  # drop entries of settled leases
            self._expiry = [(ls.deadline, ls.lease_id) for ls in self._leases.values()]
            heapq.heapify(self._expiry)
        self._arm_timer()

    def _arm_timer(self) -> None:
        """Make sure a timer fires at the next lease expiry or delayed due time."""
        due = min(
            self._expiry[0][0] if self._expiry else math.inf,
            self._delayed[0][0] if self._delayed else math.inf,
        )
        if due == math.inf:
            return
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            timer_loop, handle, at = self._timer
            if timer_loop is loop and not handle.cancelled() and at <= due:
                return
            handle.cancel()
        handle = loop.call_later(max(due - time.monotonic(), 0.0) + 0.001, self._on_timer)
        self._timer = (loop, handle, due)

    def _on_timer(self) -> None:
        self._timer = None
        self._tick()
        self._notify()
        self._arm_timer()


class _Credit:
    """How many unsettled deliveries one ``deliveries()`` iterator holds."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


class MemoryAdapter:
    """A ``BrokerAdapter`` over a ``MemoryBroker`` (a private one unless ``broker=`` is given).

    ``visibility_timeout`` is the lease of each delivery; ``dead_letter_queue`` names the
    dead-letter queue of a queue (a format string with ``{queue}``).
    """

    def __init__(
        self,
        url: str | BrokerURL = "memory://",
        *,
        visibility_timeout: float = 60.0,
        dead_letter_queue: str = "{queue}.dlq",
        broker: MemoryBroker | None = None,
    ) -> None:
        self.url = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
        if self.url.scheme != "memory":
            raise ConfigurationError(f"MemoryAdapter needs a memory:// URL, not {self.url}")
        if visibility_timeout <= 0:
            raise ConfigurationError("visibility_timeout must be positive")
        try:
            dead_letter_queue.format(queue="q")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(f"bad dead_letter_queue {dead_letter_queue!r}") from exc
        self.broker = broker if broker is not None else MemoryBroker(self.url.host or "memory")
        self.visibility_timeout = visibility_timeout
        self.dead_letter_queue = dead_letter_queue
        self._unsettled: dict[int, _Credit] = {}
        self._status = "new"  # new | open | closed | crashed

    def __repr__(self) -> str:
        return f"MemoryAdapter({str(self.url)!r}, {self._status})"

    async def connect(self) -> None:
        if self._status == "crashed":
            raise BrokerUnavailable("this memory adapter crashed (injected fault)")
        self.broker.faults._check("connect")
        self._status = "open"

    async def close(self) -> None:
        if self._status != "open":
            return
        self._status = "closed"
        if not self.broker.faults.down:  # an unreachable broker redelivers after the lease
            self.broker._release(list(self._unsettled))
        self._unsettled.clear()
        self.broker._notify()

    async def publish(self, queue: str, message: OutgoingMessage) -> None:
        self._require_open()
        self.broker.faults._check("publish")
        self.broker._publish(queue, message)

    async def deliveries(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, not {prefetch}")
        names = queue_list(queues)
        if not names:
            raise ConfigurationError("deliveries() needs at least one queue")
        credit = _Credit()
        for turn in itertools.count():
            self._require_open(allow_closed=True)
            if self._status == "closed":
                return
            self.broker.faults._check("fetch")
            lease = None
            if credit.held < prefetch:
                start = turn % len(names)  # rotate so that no queue starves another
                lease = self.broker._take(names[start:] + names[:start], self.visibility_timeout)
            if lease is None:
                await self.broker._wait()
                continue
            credit.held += 1
            self._unsettled[lease.lease_id] = credit
            yield self._delivery(lease)

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        if self._status != "open" or delivery.token not in self._unsettled:
            return  # settled already, or handed back by close(): a no-op
        self.broker.faults._check("settle")
        self._unsettled.pop(delivery.token).held -= 1
        self.broker._settle(delivery.token, outcome, self.dead_letter_queue)

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        if self._status != "open" or delivery.token not in self._unsettled:
            return
        self.broker.faults._check("extend")
        self.broker._extend(delivery.token, seconds)

    async def depth(self, queue: str) -> QueueDepth:
        self._require_open()
        self.broker.faults._check("depth")
        return self.broker.depth(queue)

    def _crash(self) -> list[int]:
        """Die like a killed process: nothing is handed back; returns the abandoned leases."""
        abandoned = list(self._unsettled)
        self._unsettled.clear()
        self._status = "crashed"
        self.broker._notify()
        return abandoned

    def _require_open(self, *, allow_closed: bool = False) -> None:
        if self._status == "crashed":
            raise BrokerUnavailable("this memory adapter crashed (injected fault)")
        if self._status == "new" or (self._status == "closed" and not allow_closed):
            raise BrokerError(f"{self!r} is not connected: call connect() first")

    @staticmethod
    def _delivery(lease: _Lease) -> Delivery:
        record = lease.record
        return Delivery(
            body=record.body,
            content_type=record.content_type,
            content_encoding=record.content_encoding,
            headers=copy.deepcopy(record.headers),
            properties=copy.deepcopy(record.properties),
            queue=lease.queue,
            redelivered=record.redelivered,
            token=lease.lease_id,
            envelope_error=record.envelope_error,
        )
