"""Load the captured Celery 5.7 wire fixtures as ``Delivery`` objects, as an adapter would.

The fixtures live in ``shared/fixtures/celery_wire`` (``index.json`` says what each file shows);
``SERVE_QUEUE_CELERY_FIXTURES`` points elsewhere. Unwrapping the transport envelope (the Redis
list item, the base64 SQS MessageBody, AMQP properties) is done here, the way the adapters do it,
so that the protocol tests feed ``decode`` exactly what it gets in production.
"""

from __future__ import annotations

import ast
import base64
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu.utils import json as kombu_json

from serve_queue.types import Delivery

FIXTURES = Path(os.environ.get("SERVE_QUEUE_CELERY_FIXTURES", "/work/shared/fixtures/celery_wire"))
TRANSPORTS = ("redis", "amqp", "sqs")
#: Properties kombu's virtual transports add to the envelope; not part of the task message.
TRANSPORT_PROPERTIES = frozenset({"delivery_info", "body_encoding", "delivery_tag"})


@dataclass(frozen=True)
class Captured:
    """One message a real Celery producer left on a broker."""

    transport: str
    case: str  # fixture file stem, e.g. "apply_async_full_options"
    index: int
    producer_call: str
    delivery: Delivery
    headers: dict[str, Any]  # as the fixture records them (AMQP application_headers)
    properties: dict[str, Any]  # without transport-only keys
    body: Any  # the body as Python objects (kombu markers turned into datetime, Decimal, ...)

    @property
    def label(self) -> str:
        return f"{self.transport}-{self.case}-{self.index}"


def load_json(relative: str) -> Any:
    return json.loads((FIXTURES / relative).read_text())


def envelope_delivery(envelope: Mapping[str, Any], queue: str = "celery") -> Delivery:
    """A Redis/SQS kombu JSON envelope as the adapter hands it over (base64 body unwrapped)."""
    properties = dict(envelope.get("properties") or {})
    return Delivery(
        body=base64.b64decode(envelope["body"]),
        content_type=envelope.get("content-type") or "",
        content_encoding=envelope.get("content-encoding") or "",
        headers=dict(envelope.get("headers") or {}),
        properties={k: v for k, v in properties.items() if k not in TRANSPORT_PROPERTIES},
        queue=queue,
        redelivered=bool(properties.get("delivery_info", {}).get("redelivered")),
        token=properties.get("delivery_tag"),
    )


def amqp_delivery(body: bytes, properties: Mapping[str, Any], queue: str = "celery") -> Delivery:
    """An AMQP basic.deliver as the adapter hands it over: raw body, headers table, properties."""
    rest = {
        k: v
        for k, v in properties.items()
        if k not in ("content_type", "content_encoding", "application_headers")
    }
    return Delivery(
        body=body,
        content_type=properties.get("content_type") or "",
        content_encoding=properties.get("content_encoding") or "",
        headers=dict(properties.get("application_headers") or {}),
        properties=rest,
        queue=queue,
        redelivered=False,
        token=None,
    )


def expected_body(message: Mapping[str, Any]) -> Any:
    """The fixture's ``body_decoded`` as Python objects, decoded independently of serve_queue."""
    decoded = message["body_decoded"]
    if isinstance(decoded, dict) and "__python_repr__" in decoded:  # pickle
        return ast.literal_eval(decoded["__python_repr__"])
    # kombu markers -> datetime, UUID, ...
    return kombu_json.loads(json.dumps(decoded))  # type: ignore[no-untyped-call]


def producer_messages() -> Iterator[Captured]:
    """Every message of every ``<transport>/producer/*.json`` capture."""
    for transport in TRANSPORTS:
        for path in sorted((FIXTURES / transport / "producer").glob("*.json")):
            if path.name.startswith("_") or ".raw." in path.name:
                continue
            capture = json.loads(path.read_text())
            for index, message in enumerate(capture["messages"]):
                yield _captured(transport, path, index, capture["producer_call"], message)


def _captured(
    transport: str, path: Path, index: int, call: str, message: Mapping[str, Any]
) -> Captured:
    case = path.name.removesuffix(".json")
    if transport == "amqp":
        raw = (path.parent / f"{case}.{index}.raw.body.bin").read_bytes()
        properties = message["properties"]
        delivery = amqp_delivery(raw, properties)
        headers = dict(properties.get("application_headers") or {})
    else:
        if transport == "redis":
            item = (path.parent / f"{case}.{index}.raw.json").read_text()
        else:  # the exact SQS MessageBody: base64 of the JSON envelope
            raw_body = (path.parent / f"{case}.{index}.raw_messagebody.txt").read_text()
            item = base64.b64decode(raw_body).decode()
        envelope = json.loads(item)
        delivery = envelope_delivery(envelope)
        headers = dict(envelope["headers"])
    return Captured(
        transport=transport,
        case=case,
        index=index,
        producer_call=call,
        delivery=delivery,
        headers=headers,
        properties=dict(delivery.properties),
        body=expected_body(message),
    )


def monitor_pushes(relative: str) -> list[dict[str, Any]]:
    """The task envelopes LPUSHed/RPUSHed in a Redis MONITOR capture, in order."""
    pushes = []
    for command in load_json(relative)["commands"]:
        if command.get("cmd") in ("LPUSH", "RPUSH"):
            envelope = json.loads(command["args"][1])
            if isinstance(envelope, dict) and envelope.get("headers", {}).get("task"):
                pushes.append(envelope)
    return pushes
