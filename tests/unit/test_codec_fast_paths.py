"""The codec's fast paths give exactly what the general paths give.

- JSON: the stdlib C encoder is tried before kombu's encoder; for plain JSON values the bytes
  must be identical, and values kombu marks (datetime, Decimal, UUID, bytes) must still be
  marked.
- Task ids: ``new_task_id`` is a well-formed random version 4 UUID string.
- Decoding builds ``TaskMessage`` positionally: every field must land where it belongs.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from kombu.utils import json as kombu_json

from serve_queue import protocol
from serve_queue.results import meta
from serve_queue.types import Delivery

VALUES: list[Any] = [
    None,
    [1, 2.5, "x", True, None],
    ([2, 3], {"a": {"b": [1, {"c": "é"}]}}, {"callbacks": None, "chain": None}),
    {"status": "SUCCESS", "result": {"k": [1, 2]}, "traceback": None, "children": []},
    {"text": 'quo"te \\ back\nslash \u2028', "n": -0.0, "big": 10**30},
    {"when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)},
    {"amount": Decimal("1.10"), "id": uuid.UUID(int=7), "raw": b"\x00\xff"},
]


@pytest.mark.parametrize("value", VALUES)
def test_json_fast_path_is_byte_identical_to_kombu(value: Any) -> None:
    expected = kombu_json.dumps(value)
    assert meta.dumps(value) == expected
    data, content_type, encoding = protocol.dumps(value)
    assert data == expected.encode()
    assert (content_type, encoding) == ("application/json", "utf-8")


def test_unencodable_values_still_fail_as_before() -> None:
    with pytest.raises(TypeError):
        meta.dumps({"x": object()})
    with pytest.raises(protocol.EncodeError):
        protocol.dumps({"x": object()})


def test_new_task_id_is_a_random_uuid4_string() -> None:
    ids = {protocol.new_task_id() for _ in range(2000)}
    assert len(ids) == 2000
    for task_id in ids:
        parsed = uuid.UUID(task_id)
        assert str(parsed) == task_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_decode_puts_every_field_in_its_place() -> None:
    headers = {
        "lang": "py", "task": "t.add", "id": "id-1", "shadow": None,
        "eta": "2026-01-02T03:04:05+00:00", "expires": "2026-01-03T00:00:00+00:00",
        "group": "g-1", "group_index": 2, "retries": 3, "timelimit": [10, 5],
        "root_id": "r-1", "parent_id": "p-1", "argsrepr": "(1,)", "kwargsrepr": "{}",
        "origin": "o", "ignore_result": True, "compression": None,
    }  # fmt: skip
    embed = {"callbacks": [{"task": "cb"}], "errbacks": [{"task": "eb"}],
             "chain": [{"task": "next"}], "chord": {"task": "chord"}}  # fmt: skip
    body, content_type, encoding = protocol.dumps([[1], {"k": 2}, embed])
    delivery = Delivery(body, content_type, encoding, headers, {"priority": 4}, "q", False, None)
    m = protocol.decode(delivery)
    assert (m.id, m.name, m.args, m.kwargs, m.protocol) == ("id-1", "t.add", [1], {"k": 2}, 2)
    assert m.properties == {"priority": 4} and m.content_type == "application/json"
    assert m.eta == datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert m.expires == datetime(2026, 1, 3, tzinfo=timezone.utc)
    assert (m.retries, m.time_limit, m.soft_time_limit, m.ignore_result) == (3, 10, 5, True)
    assert (m.root_id, m.parent_id, m.group_id, m.group_index) == ("r-1", "p-1", "g-1", 2)
    assert m.callbacks == [{"task": "cb"}] and m.errbacks == [{"task": "eb"}]
    assert m.chain == [{"task": "next"}] and m.chord == {"task": "chord"}
    assert m.compression is None and m.headers["origin"] == "o"


@pytest.mark.parametrize(
    ("key", "bad"),
    [("retries", "3"), ("root_id", 1), ("parent_id", []), ("group", 5), ("group_index", "1")],
)
def test_a_mistyped_optional_header_is_still_named(key: str, bad: Any) -> None:
    headers = {"task": "t.add", "id": "id-1", key: bad}
    body, content_type, encoding = protocol.dumps([[], {}, None])
    delivery = Delivery(body, content_type, encoding, headers, {}, "q", False, None)
    with pytest.raises(protocol.DecodeError, match=f"malformed header '{key}'"):
        protocol.decode(delivery)
