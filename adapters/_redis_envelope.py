"""kombu's Redis list item (the "envelope") in and out, plus the records derived from it.

The envelope (celery-wire-format.md §5.1.2)::

    {"body": "<base64>", "content-encoding": "utf-8", "content-type": "application/json",
     "headers": {...},
     "properties": {..., "delivery_info": {"exchange": "", "routing_key": "<queue>"},
                    "priority": 0, "body_encoding": "base64", "delivery_tag": "<uuid4>"}}
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any

from serve_queue.types import Delivery, OutgoingMessage

__all__ = [
    "dead_letter_record",
    "decode_delivery",
    "encode_envelope",
    "mark_redelivered",
    "unacked_entry",
]


def encode_envelope(queue: str, message: OutgoingMessage) -> bytes:
    """The list item a kombu producer would push for ``message`` on ``queue``."""
    properties: dict[str, Any] = {"delivery_mode": 2, **message.properties}
    properties.update(
        delivery_info={"exchange": "", "routing_key": queue},
        priority=message.priority,
        body_encoding="base64",
        delivery_tag=str(uuid.uuid4()),
    )
    envelope = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": dict(message.headers),
        "properties": properties,
    }
    return json.dumps(envelope).encode("utf-8")


#: what json raises on input it cannot take: bad JSON (UnicodeDecodeError included), nesting
#: deeper than the decoder can follow, or a value too big for memory
_UNDECODABLE = (ValueError, RecursionError, MemoryError)


def decode_delivery(item: bytes, queue: str, token: Any, malformed: bool | None) -> Delivery:
    """A Delivery for one list item; a broken envelope yields ``envelope_error`` + raw body.

    Total: no item, however deep, big or odd, makes it raise; whatever goes wrong becomes the
    ``envelope_error`` of a delivery the consumer dead-letters with the original bytes.
    ``malformed`` says whether the fetch script found no ``properties.delivery_tag``; ``None``
    decides it here, as that script would, and stores the verdict in ``token.malformed``.
    """
    try:
        return _decode(item, queue, token, malformed)
    except Exception as exc:  # a bug here must not stop the consumer: quarantine the item
        if malformed is None:
            token.malformed = True
        return _broken(item, queue, token, f"undecodable envelope ({type(exc).__name__})",
                       token.malformed)  # fmt: skip


def _decode(item: bytes, queue: str, token: Any, malformed: bool | None) -> Delivery:
    try:
        envelope = json.loads(item.decode("utf-8"))  # str: skips json's encoding sniffing
    except _UNDECODABLE as exc:
        reason = str(exc)[:200] if isinstance(exc, ValueError) else type(exc).__name__
        return _broken(item, queue, token, f"list item is not JSON ({reason})", malformed)
    if not isinstance(envelope, dict):
        return _broken(item, queue, token, "list item is not a JSON object", malformed)
    properties = envelope.get("properties")
    headers = envelope.get("headers") or {}
    if not isinstance(properties, dict):
        return _broken(item, queue, token, "envelope has no 'properties' object", malformed)
    if malformed is None:
        tag = properties.get("delivery_tag")
        malformed = token.malformed = not (isinstance(tag, str) and tag != "")
    if malformed:
        return _broken(item, queue, token, "envelope has no properties.delivery_tag")
    if not isinstance(headers, dict):
        return _broken(item, queue, token, "envelope 'headers' is not an object")
    body, error = _body(envelope.get("body"), properties.get("body_encoding"))
    if body is None:
        return _broken(item, queue, token, error)
    info = properties.get("delivery_info")
    redelivered = bool(headers.get("redelivered")) or (
        isinstance(info, dict) and bool(info.get("redelivered"))
    )
    content_type = envelope.get("content-type")
    content_encoding = envelope.get("content-encoding")
    return Delivery(
        body=body,
        content_type=content_type if isinstance(content_type, str) else "",
        content_encoding=content_encoding if isinstance(content_encoding, str) else "",
        headers=headers,
        properties=properties,
        queue=queue,
        redelivered=redelivered,
        token=token,
    )


def _body(body: Any, encoding: Any) -> tuple[bytes | None, str]:
    if not isinstance(body, str):
        return None, "envelope 'body' is missing or not a string"
    if encoding == "base64":
        try:
            return base64.b64decode(body, validate=True), ""
        except (binascii.Error, ValueError):
            return None, "envelope body is not valid base64"
    if encoding is None:
        return body.encode("utf-8", "surrogatepass"), ""
    return None, f"unsupported body_encoding {str(encoding)[:40]!r}"


def _broken(
    item: bytes, queue: str, token: Any, error: str, malformed: bool | None = True
) -> Delivery:
    if malformed is None:  # the fetch script would not find a delivery tag either
        token.malformed = True
    return Delivery(
        body=item,
        content_type="",
        content_encoding="",
        headers={},
        properties={},
        queue=queue,
        redelivered=False,
        token=token,
        envelope_error=error,
    )


def mark_redelivered(item: bytes) -> bytes:
    """``item`` with ``headers.redelivered`` and ``delivery_info.redelivered`` set, as kombu's
    restore does; an item that is not a JSON object comes back unchanged."""
    try:
        envelope = json.loads(item)
    except _UNDECODABLE:
        return item
    if not isinstance(envelope, dict):
        return item
    _set_redelivered(envelope)
    return json.dumps(envelope).encode("utf-8")


def _set_redelivered(envelope: dict[str, Any]) -> None:
    headers = envelope.get("headers")
    if isinstance(headers, dict):
        headers["redelivered"] = True
    properties = envelope.get("properties")
    info = properties.get("delivery_info") if isinstance(properties, dict) else None
    if isinstance(info, dict):
        info["redelivered"] = True


def unacked_entry(value: bytes) -> tuple[bytes, str, str, int] | None:
    """Parse a kombu ``unacked`` value into (restored item marked redelivered, exchange,
    routing key, priority); ``None`` if it is not ``[object, str, str]``."""
    try:
        envelope, exchange, routing_key = json.loads(value)
    except (*_UNDECODABLE, TypeError):
        return None
    if not (isinstance(envelope, dict) and isinstance(exchange, str)):
        return None
    if not isinstance(routing_key, str):
        return None
    _set_redelivered(envelope)
    properties = envelope.get("properties")
    try:
        priority = int(properties.get("priority") or 0) if isinstance(properties, dict) else 0
    except (TypeError, ValueError):
        priority = 0
    return json.dumps(envelope).encode("utf-8"), exchange, routing_key, priority


def dead_letter_record(item: bytes, reason: str, queue: str) -> bytes:
    """The JSON record pushed onto a dead-letter list: reason, queue, time, original item."""
    record: dict[str, Any] = {
        "reason": reason,
        "queue": queue,
        "dead_lettered_at": time.time(),
    }
    try:
        record["item"] = item.decode("utf-8")
    except UnicodeDecodeError:
        record["item"] = base64.b64encode(item).decode("ascii")
        record["item_encoding"] = "base64"
    return json.dumps(record).encode("utf-8")
