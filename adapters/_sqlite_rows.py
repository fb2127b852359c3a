"""Conversions between SQLite rows and serve_queue values for the embedded broker.

Headers, properties and result metas are stored as kombu JSON, which keeps datetime, date,
time, Decimal, UUID and bytes values intact (plain ``json`` would reject or flatten them).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from kombu.utils import json as kombu_json

from serve_queue.adapters._sqlite_schema import DeadLetterRow, MessageRow, NewMessage
from serve_queue.types import Delivery, OutgoingMessage

__all__ = [
    "DeadLetteredMessage",
    "Lease",
    "Stream",
    "dead_lettered",
    "decode_mapping",
    "delivery",
    "encode_json",
    "new_message",
]

encode_json = cast(Callable[[Any], str], kombu_json.dumps)
_decode_json = cast(Callable[[str], Any], kombu_json.loads)


def decode_mapping(text: str) -> dict[str, Any]:
    """A JSON object stored by ``encode_json``; ``ValueError`` if it is anything else."""
    # kombu's object hook only matters where kombu wrote a type marker; plain json is faster
    value = _decode_json(text) if "__type__" in text else json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


class Stream:
    """One ``deliveries()`` iteration: its prefetch budget and its wake-up event.

    ``held`` has the lease tokens claimed and not yet settled (yielded or about to be);
    ``settling`` those whose settle is under way, so that a concurrent second one is a no-op.
    """

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.held: set[str] = set()
        self.settling: set[str] = set()
        self.changed = asyncio.Event()  # set on settle, publish, close

    def room(self) -> int:
        return self.prefetch - len(self.held)

    def begin_settle(self, token: str) -> bool | None:
        """Start settling ``token``: ``None`` if a settle of it is already under way, else
        whether it was held (``False``: settled before, or a retry after a failed settle)."""
        if token in self.settling:
            return None
        self.settling.add(token)
        return token in self.held

    def release(self, token: str) -> None:
        """The delivery is settled: its prefetch slot is free."""
        self.held.discard(token)
        self.settling.discard(token)
        self.changed.set()


@dataclass(frozen=True, slots=True)
class Lease:
    """The token inside an SQLite ``Delivery``: which row, which lease, which iteration."""

    msg_id: int
    token: str
    stream: Stream = field(compare=False)


@dataclass(frozen=True, slots=True)
class DeadLetteredMessage:
    """A dead-lettered message: the original bytes and metadata, plus why and when."""

    queue: str
    source_queue: str
    reason: str
    dead_lettered_at: float
    body: bytes
    content_type: str
    content_encoding: str
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    priority: int
    enqueued_at: float
    delivery_count: int


def new_message(queue: str, message: OutgoingMessage) -> NewMessage:
    return NewMessage(
        queue=queue,
        priority=message.priority,
        body=bytes(message.body),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=encode_json(dict(message.headers)),
        properties=encode_json(dict(message.properties)),
    )


def delivery(row: MessageRow, stream: Stream) -> Delivery:
    """The ``Delivery`` of a claimed row; unreadable headers set ``envelope_error``."""
    error = None
    try:
        headers, properties = decode_mapping(row.headers), decode_mapping(row.properties)
    except (TypeError, ValueError, RecursionError, MemoryError) as exc:
        # RecursionError: nested past what the decoder can follow; MemoryError: too big
        detail = str(exc)[:200] or type(exc).__name__
        headers, properties, error = {}, {}, f"unreadable headers or properties: {detail}"
    body = row.body if isinstance(row.body, bytes) else str(row.body).encode()
    return Delivery(
        body=body,
        content_type=row.content_type,
        content_encoding=row.content_encoding,
        headers=headers,
        properties=properties,
        queue=row.queue,
        redelivered=row.delivery_count > 0,
        token=Lease(row.id, row.token, stream),
        envelope_error=error,
    )


def dead_lettered(row: DeadLetterRow) -> DeadLetteredMessage:
    try:
        headers, properties = decode_mapping(row.headers), decode_mapping(row.properties)
    except (TypeError, ValueError, RecursionError, MemoryError):
        headers, properties = {"raw": row.headers}, {"raw": row.properties}
    return DeadLetteredMessage(
        queue=row.queue,
        source_queue=row.source_queue,
        reason=row.reason,
        dead_lettered_at=row.dead_lettered_at,
        body=bytes(row.body),
        content_type=row.content_type,
        content_encoding=row.content_encoding,
        headers=headers,
        properties=properties,
        priority=row.priority,
        enqueued_at=row.enqueued_at,
        delivery_count=row.delivery_count,
    )
