"""What the RabbitMQ adapter declares, and where it routes: Celery's queues, delay queues, DLQs.

Every declaration is made once per connection (``declared`` is the connection's cache).
RabbitMQ refuses to redeclare an entity with other arguments (PRECONDITION_FAILED, and it
closes the channel): that is a deployment mistake, raised as ``ConfigurationError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel as RawChannel

from serve_queue.adapters._amqp_link import translated
from serve_queue.adapters._amqp_wire import DELAY_RUNGS, delay_queue
from serve_queue.errors import BrokerError, ConfigurationError

__all__ = ["QueueBinding", "Topology"]


@dataclass(frozen=True, slots=True)
class QueueBinding:
    """How Celery routes to a queue (its ``task_queues`` entry): exchange, type, routing key."""

    exchange: str
    exchange_type: str = "direct"
    routing_key: str | None = None  # None: the queue's name


class Topology:
    """Declares and routes, given the adapter's options (see ``RabbitMQAdapter``)."""

    def __init__(
        self,
        *,
        queue_arguments: Mapping[str, Any],
        bindings: Mapping[str, QueueBinding],
        dead_letter_queue: str,
        dead_letter_exchange: str,
        declare_dead_letter: bool,
    ) -> None:
        self.queue_arguments = dict(queue_arguments)
        self.bindings = dict(bindings)
        self.dead_letter_queue = dead_letter_queue
        self.dead_letter_exchange = dead_letter_exchange
        self.declare_dead_letter = declare_dead_letter

    def route(self, queue: str) -> tuple[str, str]:
        """(exchange, routing key) to publish a task for ``queue``, as Celery does: direct
        exchanges are replaced by the default exchange and the queue's name."""
        binding = self.bindings.get(queue)
        if binding is None or binding.exchange_type == "direct":
            return "", queue
        return binding.exchange, binding.routing_key or queue

    def dead_letter_route(self, queue: str) -> tuple[str, str]:
        """(exchange, routing key) of ``queue``'s dead letters (the key is the DLQ's name)."""
        return self.dead_letter_exchange, self.dead_letter_queue.format(queue=queue)

    async def queue(self, channel: RawChannel, queue: str, declared: set[Hashable]) -> None:
        """Celery's topology for ``queue``: its exchange, the queue, the binding."""
        if ("queue", queue) in declared:
            return
        binding = self.bindings.get(queue, QueueBinding(queue))
        args = self.queue_arguments
        with _declaring(f"queue {queue!r}", args):
            if binding.exchange:
                await channel.exchange_declare(
                    binding.exchange, exchange_type=binding.exchange_type, durable=True
                )
            await channel.queue_declare(queue, durable=True, arguments=args or None)
            if binding.exchange:
                key = binding.routing_key or queue
                await channel.queue_bind(queue, binding.exchange, routing_key=key)
        declared.add(("queue", queue))

    async def delays(self, channel: RawChannel, queue: str, declared: set[Hashable]) -> None:
        """Every delay queue of ``queue``, rung 0 last: if rung 0 exists, they all do."""
        if ("delay", queue) in declared:
            return
        args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
        for rung in reversed(range(DELAY_RUNGS)):
            name = delay_queue(queue, rung)
            with _declaring(f"delay queue {name!r}", args):
                await channel.queue_declare(name, durable=True, arguments=args)
        declared.add(("delay", queue))

    async def dead_letter(self, channel: RawChannel, queue: str, declared: set[Hashable]) -> None:
        """``queue``'s dead-letter queue (and exchange, bound), if the adapter declares them."""
        exchange, dlq = self.dead_letter_route(queue)
        if not self.declare_dead_letter or ("dlq", dlq) in declared:
            return
        with _declaring(f"dead-letter queue {dlq!r}", {}):
            if exchange:
                await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
            await channel.queue_declare(dlq, durable=True)
            if exchange:
                await channel.queue_bind(dlq, exchange, routing_key=dlq)
        declared.add(("dlq", dlq))


@contextlib.contextmanager
def _declaring(what: str, arguments: Mapping[str, Any]) -> Iterator[None]:
    try:
        with translated(f"declare {what}"):
            yield
    except BrokerError as exc:
        cause = exc.__cause__
        if isinstance(cause, aiormq.exceptions.ChannelPreconditionFailed):
            raise ConfigurationError(
                f"RabbitMQ refuses to declare {what} with arguments {dict(arguments)}: it "
                f"exists with different ones ({cause}). Declare it the same way everywhere "
                "(max_priority <-> Celery's task_queue_max_priority, queue_arguments for the "
                "rest) or delete it."
            ) from cause
        raise
