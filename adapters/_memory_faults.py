"""Fault injection for the in-memory broker (``MemoryBroker.faults``; see ``memory.py``).

What real brokers and processes do to a consumer, on demand: an outage, failing calls,
duplicate deliveries, leases that expire early, a consumer process that dies mid-task, and
transport items that cannot be unwrapped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from serve_queue.errors import BrokerUnavailable
from serve_queue.types import Delivery

if TYPE_CHECKING:
    from serve_queue.adapters.memory import MemoryAdapter, MemoryBroker

__all__ = ["MemoryFaults"]


class MemoryFaults:
    """Fault injection for one ``MemoryBroker``: what real brokers and processes do to a consumer.

    Operations that can be made to fail: ``connect``, ``publish``, ``fetch`` (the next step of a
    ``deliveries()`` iterator), ``settle``, ``extend``, ``depth``. They raise
    ``BrokerUnavailable`` and change nothing on the broker.
    """

    OPERATIONS = frozenset({"connect", "publish", "fetch", "settle", "extend", "depth"})

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._down_until: float | None = None
        self._failures: dict[str, int] = {}
        self._duplicates = 0

    @property
    def down(self) -> bool:
        """True while the broker is unreachable."""
        if self._down_until is not None and time.monotonic() >= self._down_until:
            self._down_until = None
        return self._down_until is not None

    def go_down(self, duration_s: float | None = None) -> None:
        """Make every operation raise ``BrokerUnavailable`` until ``restore()`` (or for
        ``duration_s`` seconds); waiting ``deliveries()`` iterators raise at once."""
        self._down_until = math.inf if duration_s is None else time.monotonic() + duration_s
        self._broker._notify()

    def restore(self) -> None:
        """End an outage started by ``go_down``."""
        self._down_until = None

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The broker is unreachable inside the ``with`` block."""
        self.go_down()
        try:
            yield
        finally:
            self.restore()

    def fail_next(self, operation: str, count: int = 1) -> None:
        """The next ``count`` calls of ``operation`` (see the class docstring) fail."""
        if operation not in self.OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}: {sorted(self.OPERATIONS)}")
        self._failures[operation] = self._failures.get(operation, 0) + count

    def fail_publishes(self, count: int = 1) -> None:
        """The next ``count`` publishes raise ``BrokerUnavailable`` (nothing is enqueued)."""
        self.fail_next("publish", count)

    def duplicate_next(self, count: int = 1) -> None:
        """The next ``count`` messages taken are delivered twice: a copy (marked redelivered)
        goes back to the front of the queue, as an at-least-once broker may do."""
        self._duplicates += count

    def expire_leases(self, queue: str | None = None) -> int:
        """Expire every lease now (of ``queue`` only, if given), as if the visibility timeout had
        passed: the messages go back, redelivered. Returns how many."""
        broker = self._broker
        ids = [i for i, ls in broker._leases.items() if queue is None or ls.queue == queue]
        return broker._release(ids)

    def redeliver(self, delivery: Delivery) -> bool:
        """Expire the lease of one delivery now; False if it was already settled or expired."""
        return self._broker._release([delivery.token]) == 1

    def crash(self, adapter: MemoryAdapter, *, expire_leases: bool = False) -> int:
        """Kill ``adapter`` like a killed process: its unsettled deliveries are abandoned (they
        come back when their lease expires, at once with ``expire_leases``), its iterators and
        every later call raise ``BrokerUnavailable``, and settling is a no-op. Returns how many
        deliveries were abandoned."""
        if adapter.broker is not self._broker:
            raise ValueError(f"{adapter!r} does not use {self._broker!r}")
        abandoned = adapter._crash()
        if expire_leases:
            self._broker._release(abandoned)
        return len(abandoned)

    def push_malformed(
        self, queue: str, raw: bytes, error: str = "malformed item (injected)"
    ) -> None:
        """Put a transport item the adapter cannot unwrap on ``queue``: it is delivered with
        ``envelope_error`` set and ``raw`` as its body."""
        self._broker._push_malformed(queue, raw, error)

    def _check(self, operation: str) -> None:
        if self.down:
            raise BrokerUnavailable(f"{self._broker!r} is unavailable (injected outage)")
        if self._failures.get(operation, 0) > 0:
            self._failures[operation] -= 1
            raise BrokerUnavailable(f"{operation} failed on {self._broker!r} (injected fault)")

    def _take_duplicate(self) -> bool:
        if self._duplicates > 0:
            self._duplicates -= 1
            return True
        return False
