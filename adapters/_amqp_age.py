"""How long the oldest ready message of a RabbitMQ queue has waited, as one consumer sees it.

AMQP offers no look at a queue's head without taking the message (``basic.get`` would, and
the management plugin's ``head_message_timestamp`` is not always there), so the estimate is
built from what this adapter's consumers receive. RabbitMQ hands a queue's messages out in
order, so every message still ready was published after the ones already delivered, and
after the last moment the queue was seen empty. While ``ready > 0`` the oldest one has
therefore waited at most::

    now - max(send time of the newest message delivered here, last time depth() saw ready == 0)

The send time is the AMQP ``timestamp`` property (whole seconds, by the producer's clock),
which the serve_queue producer sets. A message without one (from Celery, which sets none)
counts with the time it was delivered here: for such traffic the figure is how long the queue
has not moved for this consumer, which is how long its ready messages have waited at least
since then, not a bound on their age. Priorities and messages requeued to the front break the
order the estimate relies on; it is then only indicative. ``None`` until this adapter has
received a message or seen the queue empty, and whenever nothing is ready.
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["DeliveryClock"]


class DeliveryClock:
    """Per queue, the latest instant all of its ready messages are known to be younger than."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def delivered(self, queue: str, sent: object, now: float) -> None:
        """A message of ``queue`` reached this adapter (``sent``: its AMQP timestamp)."""
        at = sent.timestamp() if isinstance(sent, datetime) else now
        self._since[queue] = max(self._since.get(queue, at), min(at, now))

    def oldest(self, queue: str, ready: int, now: float) -> float | None:
        """The age bound of the module docstring for ``queue`` given its ``ready`` count."""
        if ready <= 0:
            self._since[queue] = now
            return None
        since = self._since.get(queue)
        return None if since is None else max(now - since, 0.0)
