"""AMQP 0-9-1 message plumbing for the RabbitMQ adapter: properties, header tables, names.

Headers are encoded with the field-table type tags py-amqp (Celery's client) writes and reads
back as the same Python types: ``S`` str, ``V`` None, ``t`` bool, ``I`` int32 (``l`` int64
beyond), ``d`` float (pamqp's own encoder would write a 32-bit ``f`` and lose precision), ``A``
list/tuple, ``F`` dict, ``x`` bytes, ``T`` datetime, ``D`` Decimal.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from serve_queue.errors import EncodeError
from serve_queue.types import OutgoingMessage

__all__ = [
    "DELAY_RUNGS",
    "REASON_HEADER",
    "SOURCE_HEADER",
    "WireProperties",
    "delay_queue",
    "delay_rung",
    "encode_table",
    "expiration_ms",
    "incoming_properties",
    "normalize",
    "outgoing_properties",
]

#: header names under which a dead-lettered copy keeps its reason and its source queue
REASON_HEADER = "x-dead-letter-reason"
SOURCE_HEADER = "x-dead-letter-queue"
#: delay queues per work queue: rung k holds delays of at most 2**k seconds (1 s .. ~48 days)
DELAY_RUNGS = 23
_MAX_TTL_MS = 2**32 - 1
_KEY_MAX = 128
_INT32 = range(-(2**31), 2**31)
_INT64 = range(-(2**63), 2**63)


def encode_table(table: Mapping[str, Any]) -> bytes:
    """An AMQP field table (length-prefixed), with py-amqp-compatible type tags."""
    parts: list[bytes] = []
    for key, value in table.items():
        name = str(key).encode("utf-8")
        if len(name) > _KEY_MAX:
            raise EncodeError(f"header name longer than {_KEY_MAX} bytes: {str(key)[:40]!r}...")
        parts.append(struct.pack(">B", len(name)) + name + _encode_value(value, str(key)))
    data = b"".join(parts)
    return struct.pack(">I", len(data)) + data


def _encode_value(value: Any, where: str) -> bytes:
    if value is None:
        return b"V"
    if isinstance(value, bool):
        return b"t" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if value in _INT32:
            return b"I" + struct.pack(">i", value)
        if value in _INT64:
            return b"l" + struct.pack(">q", value)
        raise EncodeError(f"header {where!r}: integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, str):
        return _long_bytes(b"S", value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _long_bytes(b"x", bytes(value))
    if isinstance(value, Mapping):
        return b"F" + encode_table(value)
    if isinstance(value, (list, tuple)):
        return _long_bytes(b"A", b"".join(_encode_value(item, where) for item in value))
    if isinstance(value, datetime):
        return b"T" + struct.pack(">Q", _epoch_seconds(value))
    if isinstance(value, Decimal):
        return b"D" + _decimal(value, where)
    raise EncodeError(f"header {where!r}: {type(value).__name__} cannot go in an AMQP table")


def _long_bytes(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack(">I", len(data)) + data


def _epoch_seconds(value: datetime) -> int:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    return max(int(aware.timestamp()), 0)


def _decimal(value: Decimal, where: str) -> bytes:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise EncodeError(f"header {where!r}: {value} cannot go in an AMQP table")
    number = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if exponent > 0:
        number, exponent = number * 10**exponent, 0
    if -exponent > 255 or number not in _INT32:
        raise EncodeError(f"header {where!r}: decimal {value} is out of AMQP's range")
    return struct.pack(">Bi", -exponent, number)


class WireProperties(Basic.Properties):
    """Basic properties whose headers table is encoded by ``encode_table``."""

    def encode_property(self, name: str, value: Any) -> bytes:
        if name == "headers":
            return encode_table(value)
        return super().encode_property(name, value)


def outgoing_properties(
    message: OutgoingMessage,
    *,
    headers: Mapping[str, Any] | None = None,
    expiration: str | None = None,
    copy: bool = False,
) -> WireProperties:
    """The AMQP properties of ``message`` (``headers``/``expiration`` replace the message's).

    ``copy``: a copy the adapter re-publishes (delay, dead letter): ``user_id`` is dropped (the
    broker checks it against the connection's user) and ``expiration`` is only ``expiration``.
    """
    props = message.properties
    mode = props.get("delivery_mode")
    return WireProperties(
        content_type=message.content_type or None,
        content_encoding=message.content_encoding or None,
        headers=dict(message.headers if headers is None else headers),
        delivery_mode=mode if mode in (1, 2) else 2,
        priority=message.priority if props.get("priority") is not None else None,
        correlation_id=_text(props.get("correlation_id")),
        reply_to=_text(props.get("reply_to")),
        expiration=expiration if copy else (expiration or _text(props.get("expiration"))),
        message_id=_text(props.get("message_id")),
        timestamp=_timestamp(props.get("timestamp")),
        message_type=_text(props.get("type")),
        user_id=None if copy else _text(props.get("user_id")),
        app_id=_text(props.get("app_id")),
    )


def _timestamp(value: Any) -> datetime | None:
    """The AMQP ``timestamp`` (whole seconds on the wire): a datetime, or epoch seconds as a
    number (what the serve_queue producer stamps); anything else is left out."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return None
    try:
        return datetime.fromtimestamp(value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


_COPIED = (
    "correlation_id",
    "reply_to",
    "priority",
    "expiration",
    "delivery_mode",
    "message_id",
    "timestamp",
    "user_id",
    "app_id",
)


def incoming_properties(message: DeliveredMessage) -> dict[str, Any]:
    """The basic properties of a delivered message as a dict, plus ``delivery_info``."""
    props = message.header.properties
    out: dict[str, Any] = {}
    for name in _COPIED:
        value = getattr(props, name, None)
        if value is not None:
            out[name] = value
    if props.message_type is not None:
        out["type"] = props.message_type
    out["delivery_info"] = {
        "exchange": message.exchange or "",
        "routing_key": message.routing_key or "",
        "redelivered": bool(message.redelivered),
    }
    return out


def normalize(value: Any) -> Any:
    """Header values as pamqp decoded them, with ``bytearray`` turned into ``bytes``."""
    kind = type(value)
    if kind is dict:
        return {k: v if type(v) in _PLAIN else normalize(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _PLAIN else normalize(v) for v in value]
    if kind is bytearray:
        return bytes(value)
    return value


_PLAIN = frozenset({str, int, bool, float, type(None)})


def delay_rung(delay_s: float) -> int:
    """The delay queue rung for a delay: the smallest k with ``delay_s <= 2**k`` (capped)."""
    if delay_s <= 1:
        return 0
    return min(math.ceil(math.log2(delay_s)), DELAY_RUNGS - 1)


def delay_queue(queue: str, rung: int) -> str:
    """Name of rung ``rung`` of ``queue``'s delay queues, e.g. ``serve_queue.delay.celery.8s``."""
    return f"serve_queue.delay.{queue}.{2**rung}s"


def expiration_ms(delay_s: float) -> str:
    """A per-message TTL (AMQP ``expiration``) in milliseconds, as the string AMQP wants."""
    return str(min(max(round(delay_s * 1000), 0), _MAX_TTL_MS))
