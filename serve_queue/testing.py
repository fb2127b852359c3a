"""Test helpers for serve_queue users and for serve_queue's own tests.

- ``MemoryBroker`` / ``MemoryAdapter``: an in-process broker and its adapter. Adapters share
  queues only when given the same broker (``broker.adapter()`` or ``MemoryAdapter(broker=...)``).
- ``broker.faults`` (``MemoryFaults``): outages, failing calls, duplicate deliveries, early
  lease expiry, a consumer that dies before acknowledging, malformed transport items.
- message builders: ``celery_message`` (a Celery protocol v2 task message, as Celery 5.7's
  ``send_task`` writes it), ``celery_message_v1`` (protocol v1) and ``make_delivery``.

The builders do not use ``serve_queue.protocol``: they write the wire format from the
reference directly, so tests of the codec are not checked against the codec itself::

    broker = MemoryBroker()
    producer, consumer = broker.adapter(), broker.adapter(visibility_timeout=1.0)
    await producer.connect()
    await producer.publish("celery", celery_message("app.add", (2, 3)))
    broker.faults.duplicate_next()        # the next message taken is delivered twice
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from kombu.utils import json as kombu_json

from serve_queue.adapters._memory_faults import MemoryFaults
from serve_queue.adapters.memory import DeadLettered, MemoryAdapter, MemoryBroker
from serve_queue.types import Delivery, OutgoingMessage

__all__ = [
    "DeadLettered",
    "MemoryAdapter",
    "MemoryBroker",
    "MemoryFaults",
    "celery_message",
    "celery_message_v1",
    "make_delivery",
]

_dumps: Callable[[Any], str] = kombu_json.dumps

#: a stable reply_to for built messages (Celery always sets one: its app's thread oid)
REPLY_TO = "5e0f0b9c-7c7d-3d2b-9c55-5e7e9a7e0c11"


def _origin() -> str:
    return f"gen{os.getpid()}@{socket.gethostname()}"


def _when(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def celery_message(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    embed: Mapping[str, Any] | None = None,
    properties: Mapping[str, Any] | None = None,
    **headers: Any,
) -> OutgoingMessage:
    """A Celery protocol v2 JSON task message for ``name(*args, **kwargs)``.

    ``headers`` override or add v2 headers (``id=``, ``retries=``, ``eta=`` as a datetime or an
    ISO string, ``expires=``, ``timelimit=[hard, soft]``, custom keys via ``**{"x-k": v}``);
    ``embed`` overrides the body's ``callbacks``/``errbacks``/``chain``/``chord``;
    ``properties`` overrides AMQP properties (``priority``, ``reply_to``...).
    """
    kwargs = dict(kwargs or {})
    task_id = str(headers.get("id") or uuid.uuid4())
    full: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(tuple(args)),
        "kwargsrepr": repr(kwargs),
        "origin": _origin(),
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    full.update(headers)
    full["eta"], full["expires"] = _when(full["eta"]), _when(full["expires"])
    body = [
        list(args),
        kwargs,
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None, **(embed or {})},
    ]
    return OutgoingMessage(
        body=_dumps(body).encode("utf-8"),
        headers=full,
        properties=_properties(task_id, properties),
    )


def celery_message_v1(
    name: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    properties: Mapping[str, Any] | None = None,
    **fields: Any,
) -> OutgoingMessage:
    """A Celery protocol v1 JSON task message: everything in the body, empty headers.

    ``fields`` override or add body fields (``id=``, ``retries=``, ``eta=``, ``callbacks=``...).
    """
    task_id = str(fields.get("id") or uuid.uuid4())
    body: dict[str, Any] = {
        "task": name,
        "id": task_id,
        "args": list(args),
        "kwargs": dict(kwargs or {}),
        "group": None,
        "group_index": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "utc": True,
        "callbacks": None,
        "errbacks": None,
        "timelimit": [None, None],
        "taskset": None,
        "chord": None,
    }
    body.update(fields)
    body["eta"], body["expires"] = _when(body["eta"]), _when(body["expires"])
    return OutgoingMessage(
        body=_dumps(body).encode("utf-8"),
        headers={},
        properties=_properties(task_id, properties),
    )


def _properties(task_id: str, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    base: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": REPLY_TO,
        "delivery_mode": 2,
        "priority": 0,
    }
    return {**base, **(overrides or {})}


def make_delivery(
    message: OutgoingMessage | bytes = b"",
    *,
    queue: str = "celery",
    redelivered: bool = False,
    envelope_error: str | None = None,
    token: Any = None,
    **fields: Any,
) -> Delivery:
    """A ``Delivery`` as an adapter would yield it, from a built message or raw body bytes.

    ``fields`` override ``content_type``, ``content_encoding``, ``headers``, ``properties``.
    A delivery made here belongs to no adapter: settle it only with a fake adapter of your own.
    """
    if isinstance(message, bytes):
        message = OutgoingMessage(body=message)
    values: dict[str, Any] = {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": dict(message.headers),
        "properties": dict(message.properties),
    }
    unknown = set(fields) - set(values)
    if unknown:
        raise TypeError(f"make_delivery() got unexpected fields {sorted(unknown)}")
    values.update(fields)
    return Delivery(
        body=message.body,
        queue=queue,
        redelivered=redelivered,
        token=token,
        envelope_error=envelope_error,
        **values,
    )
