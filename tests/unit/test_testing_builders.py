"""The message builders of ``serve_queue.testing`` write what Celery 5.7 writes.

Checked against messages a real Celery producer left on Redis (``shared/fixtures/celery_wire``):
the same header names, the same properties, the same body layout.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from kombu.utils import json as kombu_json

from serve_queue.testing import celery_message, celery_message_v1, make_delivery
from serve_queue.types import OutgoingMessage

FIXTURES = Path(os.environ.get("SERVE_QUEUE_CELERY_FIXTURES", "/work/shared/fixtures/celery_wire"))
TRANSPORT_ONLY = {"delivery_info", "body_encoding", "delivery_tag"}


def captured(case: str) -> dict[str, Any]:
    """The first message of a Redis producer fixture, as its decoded parts."""
    message: dict[str, Any] = json.loads((FIXTURES / "redis/producer" / f"{case}.json").read_text())
    return dict(message["messages"][0])


def decoded_body(message: OutgoingMessage) -> Any:
    return kombu_json.loads(message.body.decode("utf-8"))  # type: ignore[no-untyped-call]


def test_v2_message_matches_what_celery_sends() -> None:
    real = captured("delay_basic")  # add.delay(2, 3)
    ours = celery_message("sqapp.add", (2, 3))
    assert list(ours.headers) == list(real["envelope"]["headers"])
    for key in ("lang", "task", "shadow", "eta", "retries", "timelimit", "argsrepr", "stamps"):
        assert ours.headers[key] == real["envelope"]["headers"][key], key
    assert ours.headers["root_id"] == ours.headers["id"]
    real_props = set(real["envelope"]["properties"]) - TRANSPORT_ONLY
    assert set(ours.properties) == real_props
    assert ours.properties["correlation_id"] == ours.headers["id"]
    assert decoded_body(ours) == real["body_decoded"]
    assert (ours.content_type, ours.content_encoding) == ("application/json", "utf-8")


def test_v2_overrides_headers_embed_and_properties() -> None:
    eta = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ours = celery_message(
        "app.mul",
        [2],
        {"y": 3},
        embed={"chain": []},
        properties={"priority": 7},
        id="fixed",
        retries=2,
        eta=eta,
        **{"x-custom": "v"},
    )
    assert ours.headers["id"] == ours.headers["root_id"] == "fixed"
    assert ours.headers["eta"] == "2030-01-02T03:04:05+00:00"
    assert (ours.headers["retries"], ours.headers["x-custom"]) == (2, "v")
    assert ours.properties["priority"] == 7
    assert ours.priority == 7
    args, kwargs, embed = decoded_body(ours)
    assert (args, kwargs, embed["chain"], embed["callbacks"]) == ([2], {"y": 3}, [], None)


def test_rich_arguments_use_kombu_json() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    raw = json.loads(celery_message("app.t", [when]).body)
    assert raw[0][0] == {"__type__": "datetime", "__value__": "2024-05-06T07:08:09+00:00"}


def test_v1_message_matches_what_celery_sends() -> None:
    real = captured("protocol1_send_task")
    ours = celery_message_v1("sqapp.add", (2, 3), {"z": 1}, eta="2030-01-01T00:00:00+00:00")
    assert dict(ours.headers) == {}
    body = decoded_body(ours)
    assert list(body) == list(real["body_decoded"])
    assert (body["task"], body["args"], body["kwargs"]) == ("sqapp.add", [2, 3], {"z": 1})
    assert body["eta"] == "2030-01-01T00:00:00+00:00"
    assert ours.properties["correlation_id"] == body["id"]


def test_make_delivery_from_a_message_or_bytes() -> None:
    message = celery_message("app.t", id="d1")
    delivery = make_delivery(message, queue="q", redelivered=True)
    assert (delivery.body, delivery.queue, delivery.redelivered) == (message.body, "q", True)
    assert delivery.headers["id"] == "d1"
    raw = make_delivery(b"\x00junk", envelope_error="not JSON", content_type="text/plain")
    assert (raw.body, raw.envelope_error, raw.content_type) == (
        b"\x00junk",
        "not JSON",
        "text/plain",
    )
    with pytest.raises(TypeError, match="unexpected"):
        make_delivery(b"", colour="blue")
