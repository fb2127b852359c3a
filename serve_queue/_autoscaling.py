"""What autoscaling sees of a consumer deployment: each replica's stats, and how
``BacklogPolicy`` combines them with the broker's own counts into one ``Reading``.

A replica reports (``record_autoscaling_stats``, every Serve metrics interval)::

    serve_queue_running       tasks this replica is running (its own, on every broker)
    serve_queue_ready         \\
    serve_queue_reserved       | its adapter's ``depth()`` of the consumed queues, summed
    serve_queue_delayed        | (``reserved`` is broker-wide on Redis and SQLite, this
    serve_queue_backlog        | replica's own on RabbitMQ; ``backlog`` = the three summed)
    serve_queue_oldest_age_s  /  0.0 when unknown or nothing is ready

Serve's controller keeps these per replica and hands them to the policy as
``AutoscalingContext.aggregated_metrics``: per metric, per running replica, the value
aggregated over ``look_back_period_s`` with the deployment's ``aggregation_function`` (a
mean by default). ``combine`` turns them, with the broker counts the policy polls itself,
into a ``Reading`` (see its docstring for the exact rule).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from serve_queue.consumer import Consumer
from serve_queue.errors import ServeQueueError
from serve_queue.types import QueueDepth

__all__ = ["OLDEST", "RUNNING", "Reading", "combine", "replica_stats", "sum_depths"]

log = logging.getLogger("serve_queue.serve")

RUNNING = "serve_queue_running"
OLDEST = "serve_queue_oldest_age_s"


async def replica_stats(consumer: Consumer) -> dict[str, float]:
    """What one replica reports to Serve (the keys of the module docstring)."""
    stats: dict[str, float] = {RUNNING: float(consumer.running)}
    try:
        depths = await consumer.depth()
    except ServeQueueError as exc:
        log.warning("could not read queue depth: %s", exc)
        return stats
    total = sum_depths(depths.values())
    stats.update(
        serve_queue_ready=float(total.ready),
        serve_queue_reserved=float(total.reserved),
        serve_queue_delayed=float(total.delayed),
        serve_queue_backlog=float(total.total),
    )
    stats[OLDEST] = float(total.oldest_age_s or 0.0)
    return stats


def sum_depths(depths: Iterable[QueueDepth]) -> QueueDepth:
    """Counts added up over queues; the oldest age is the largest known one."""
    ready = reserved = delayed = 0
    oldest: float | None = None
    for d in depths:
        ready, reserved, delayed = ready + d.ready, reserved + d.reserved, delayed + d.delayed
        if d.oldest_age_s is not None:
            oldest = max(oldest or 0.0, d.oldest_age_s)
    return QueueDepth(ready=ready, reserved=reserved, delayed=delayed, oldest_age_s=oldest)


@dataclass(frozen=True, slots=True)
class Reading:
    """One view of a consumer deployment's work, as ``BacklogPolicy`` decides on it.

    ``ready``, ``delayed``, ``broker_reserved``: the broker's counts from the policy's own
    poll (``broker_reserved`` is 0 on RabbitMQ, which cannot count other connections'
    unacked messages). ``replica_running``: the sum of the replicas' ``serve_queue_running``
    as Serve aggregated them; ``replicas_reporting``: how many running replicas had reported.
    ``oldest_age_s``: how long the oldest ready message has waited, ``None`` if unknown or
    nothing is ready.
    """

    ready: int = 0
    delayed: int = 0
    broker_reserved: int = 0
    replica_running: float = 0.0
    replicas_reporting: int = 0
    oldest_age_s: float | None = None

    @property
    def in_flight(self) -> float:
        """Delivered and not settled: the larger of what the replicas run and what the broker
        counts as reserved. On RabbitMQ only the replicas know; on Redis and SQLite the broker's
        count also covers prefetched messages, other consumers and leases of stopped replicas
        (until they expire), while the replicas' sum covers what the last poll did not see."""
        return max(self.replica_running, float(self.broker_reserved))

    @property
    def backlog(self) -> float:
        """The work to size the deployment for: ready + in flight (delayed messages are not
        work yet: they count once they are due and ready)."""
        return self.ready + self.in_flight

    def as_state(self) -> dict[str, float | None]:
        """The reading as ``serve_queue_*`` numbers (the policy state Serve keeps)."""
        return {
            "serve_queue_ready": float(self.ready),
            "serve_queue_delayed": float(self.delayed),
            "serve_queue_broker_reserved": float(self.broker_reserved),
            "serve_queue_running": self.replica_running,
            "serve_queue_replicas_reporting": float(self.replicas_reporting),
            "serve_queue_in_flight": self.in_flight,
            "serve_queue_backlog": self.backlog,
            OLDEST: self.oldest_age_s,
        }


def combine(broker: QueueDepth, metrics: Mapping[str, Mapping[Any, float]] | None) -> Reading:
    """The broker's poll (summed over the queues) and Serve's per-replica metrics, combined.

    - in flight: ``max(sum of replicas' running, broker reserved)`` (``Reading.in_flight``);
    - oldest age, only while the poll sees ready messages: the larger of the poll's own
      reading (exact on SQLite and on Redis for stamped messages; ``None`` on RabbitMQ, whose
      messages cannot be looked at without taking them) and the smallest positive age the
      replicas report (on RabbitMQ each is an upper bound, so the smallest is the closest; on
      Redis they come from the same list heads, or a lower bound for unstamped heads).
    """
    metrics = metrics or {}
    running = metrics.get(RUNNING) or {}
    replica_ages = [age for age in (metrics.get(OLDEST) or {}).values() if age > 0]
    oldest: float | None = None
    if broker.ready > 0:
        known = [a for a in (broker.oldest_age_s, min(replica_ages, default=None)) if a is not None]
        oldest = max(known, default=None)
    return Reading(
        ready=broker.ready,
        delayed=broker.delayed,
        broker_reserved=broker.reserved,
        replica_running=float(sum(running.values())),
        replicas_reporting=len(running),
        oldest_age_s=oldest,
    )
