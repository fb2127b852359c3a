"""Golden tests of ``serve_queue.protocol`` against real Celery 5.7 wire captures.

Every producer capture of every transport (``shared/fixtures/celery_wire/<transport>/producer``)
is decoded and checked against what the capture says; encoded messages are compared with what a
real Celery producer and worker wrote (key sets, value types and values, never JSON bytes); and
random or mutated input must only ever raise ``DecodeError``/``ContentDisallowed``.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import copy
import dataclasses
import json
import lzma
import math
import random
import time as clock
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from kombu.utils import json as kombu_json

from serve_queue.errors import ContentDisallowed, DecodeError, EncodeError
from serve_queue.protocol import (
    SendOptions,
    TaskMessage,
    decode,
    dumps,
    encode_followup,
    encode_retry,
    encode_task,
    loads,
)
from serve_queue.testing import make_delivery
from serve_queue.types import Delivery, OutgoingMessage
from tests.unit.fixtures_util import (
    TRANSPORT_PROPERTIES,
    Captured,
    amqp_delivery,
    envelope_delivery,
    load_json,
    monitor_pushes,
    producer_messages,
)

UTC = timezone.utc
ALL_SERIALIZERS = ("json", "msgpack", "yaml", "pickle")
CAPTURED = list(producer_messages())
BY_LABEL = {captured.label: captured for captured in CAPTURED}
NOT_JSON = [c for c in CAPTURED if c.delivery.content_type != "application/json"]
MUL_SIG: dict[str, Any] = {"task": "sqapp.mul", "args": [10], "kwargs": {}, "options": {},
           "subtask_type": None, "immutable": False}
ON_ERROR_SIG: dict[str, Any] = {"task": "sqapp.on_error", "args": [], "kwargs": {}, "options": {},
                "subtask_type": None, "immutable": False}


def captured(case: str, transport: str = "redis", index: int = 0) -> Captured:
    return BY_LABEL[f"{transport}-{case}-{index}"]


def aware(value: str | None) -> datetime | None:
    """The wire's ISO time as the spec says to read it: naive means UTC."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def delivery_of(message: OutgoingMessage, **changes: Any) -> Delivery:
    """What an adapter would deliver for a message we published."""
    fields: dict[str, Any] = {
        "body": message.body, "content_type": message.content_type,
        "content_encoding": message.content_encoding, "headers": dict(message.headers),
        "properties": dict(message.properties), "queue": "celery", "redelivered": False,
        "token": None,
    }
    fields.update(changes)
    return Delivery(**fields)


def json_body(message: OutgoingMessage) -> Any:
    """A published JSON body, decoded independently of serve_queue (kombu markers kept as is)."""
    return json.loads(message.body)


def wire_properties(properties: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in properties.items() if k not in TRANSPORT_PROPERTIES}


# ------------------------------------------------------------------- decode: every capture


def test_every_transport_has_captures() -> None:
    assert {c.transport for c in CAPTURED} == {"redis", "amqp", "sqs"}
    assert len(CAPTURED) >= 90


@pytest.mark.parametrize("cap", CAPTURED, ids=lambda c: c.label)
def test_decode_matches_capture(cap: Captured) -> None:
    message = decode(cap.delivery, ALL_SERIALIZERS)
    if isinstance(cap.body, dict):  # protocol v1: everything in the body, headers empty
        fields, embed = cap.body, {**cap.body, "chain": None}
        args, kwargs, protocol = cap.body["args"], cap.body["kwargs"], 1
        assert cap.headers == {}
    else:
        args, kwargs, embed = cap.body
        fields, protocol = cap.headers, 2
        assert message.headers == cap.headers
    assert message.protocol == protocol
    assert (message.id, message.name) == (fields["id"], fields["task"])
    assert message.args == list(args)
    assert message.kwargs == kwargs
    assert message.eta == aware(fields["eta"])
    assert message.expires == aware(fields["expires"])
    assert message.retries == fields["retries"]
    assert [message.time_limit, message.soft_time_limit] == list(fields["timelimit"])
    assert message.ignore_result is bool(fields.get("ignore_result"))
    assert message.root_id == fields.get("root_id")
    assert message.parent_id == fields.get("parent_id")
    assert message.group_id == fields["group"]
    assert message.group_index == fields["group_index"]
    assert message.callbacks == embed["callbacks"]
    assert message.errbacks == embed["errbacks"]
    assert message.chain == embed["chain"]
    assert message.chord == embed["chord"]
    assert message.properties == cap.properties
    assert message.content_type == cap.delivery.content_type
    assert message.compression == cap.headers.get("compression")
    assert message.eta is None or message.eta.tzinfo is UTC


def test_captures_cover_every_form() -> None:
    forms = {(c.delivery.content_type, isinstance(c.body, dict)) for c in CAPTURED}
    assert ("application/json", True) in forms  # protocol v1
    assert {ct for ct, _ in forms} >= {
        "application/json", "application/x-msgpack", "application/x-yaml",
        "application/x-python-serialize",
    }


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_full_options_golden(transport: str) -> None:
    message = decode(captured("apply_async_full_options", transport).delivery)
    assert message.id == "11111111-2222-3333-4444-555555555555"
    assert message.name == "sqapp.add"
    assert (message.args, message.kwargs) == ([2, 3], {})
    assert (message.time_limit, message.soft_time_limit) == (60, 50)  # [hard, soft]
    assert message.properties["priority"] == 5
    assert message.properties["expiration"] == "120000"
    assert message.headers["x-custom"] == "v" and message.headers["tenant"] == "t1"
    assert message.callbacks == [MUL_SIG]
    assert message.errbacks == [ON_ERROR_SIG]
    assert message.eta is not None and message.expires is not None
    assert message.expires - message.eta == timedelta(seconds=90)  # countdown=30, expires=120
    assert message.root_id == message.id and message.parent_id is None


@pytest.fixture
def local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with the process's local time zone far from UTC, so naive-as-local bugs show."""
    monkeypatch.setenv("TZ", "America/New_York")
    clock.tzset()
    yield
    monkeypatch.undo()
    clock.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_eta_and_expires_are_aware_utc(transport: str) -> None:
    assert clock.timezone != 0
    naive = decode(captured("apply_async_naive_eta", transport).delivery)
    assert naive.eta == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    given = decode(captured("apply_async_eta_expires_datetime", transport).delivery)
    assert given.eta == datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert given.expires == datetime(2030, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_rich_json_types_come_back_as_objects(transport: str) -> None:
    message = decode(captured("json_rich_types", transport).delivery)
    assert message.args == [
        datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), date(2024, 5, 6), time(7, 8, 9),
        Decimal("1.10"), uuid.UUID("12345678-1234-5678-1234-567812345678"), b"ascii-bytes",
        b"\xff\x00", "unicode \u2603", None, 1.5,
    ]
    assert [type(a) for a in message.args[:7]] == [datetime, date, time, Decimal, uuid.UUID,
                                                   bytes, bytes]
    assert message.kwargs == {"nested": {"a": [1, {"b": None}], "t": [1, 2]}}


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_chain_keeps_remaining_steps_reversed(transport: str) -> None:
    message = decode(captured("chain", transport).delivery)
    assert message.chain is not None
    assert [step["task"] for step in message.chain] == ["sqapp.add", "sqapp.mul"]
    assert message.chain[-1]["args"] == [3]  # mul.s(3) runs next
    assert all(step["options"]["task_id"] for step in message.chain)


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_chord_header_tasks(transport: str) -> None:
    first = decode(captured("chord", transport, 0).delivery)
    second = decode(captured("chord", transport, 1).delivery)
    assert first.group_id == second.group_id is not None
    assert (first.group_index, second.group_index) == (0, 1)
    assert first.chord is not None and first.chord["task"] == "sqapp.tsum"
    assert first.chord["options"]["group_id"] == first.group_id


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_ignore_result_null_false_true(transport: str) -> None:
    assert captured("send_task_basic", transport).headers["ignore_result"] is None
    assert decode(captured("send_task_basic", transport).delivery).ignore_result is False
    assert decode(captured("delay_basic", transport).delivery).ignore_result is False
    assert decode(captured("ignore_result", transport).delivery).ignore_result is True


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_protocol1_messages(transport: str) -> None:
    sent = decode(captured("protocol1_send_task", transport).delivery)
    assert sent.protocol == 1
    assert (sent.name, sent.args, sent.kwargs) == ("sqapp.add", [2, 3], {"z": 1})
    assert sent.eta is not None and sent.expires is not None
    assert sent.expires - sent.eta == timedelta(seconds=50)  # countdown=10, expires=60
    assert sent.headers["task"] == "sqapp.add" and sent.headers["id"] == sent.id
    assert sent.headers["argsrepr"] == "[2, 3]"
    linked = decode(captured("protocol1_link", transport).delivery)
    assert linked.callbacks == [MUL_SIG]
    assert linked.errbacks == [ON_ERROR_SIG]
    assert linked.chain is None


def test_protocol1_with_redelivered_header_stays_v1() -> None:
    original = captured("protocol1_send_task").delivery
    restored = Delivery(original.body, original.content_type, original.content_encoding,
                        {"redelivered": True}, original.properties, "celery", True, None)
    message = decode(restored)
    assert message.protocol == 1 and message.headers["redelivered"] is True


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_compressed_body_decodes(transport: str) -> None:
    cap = captured("compression_zlib", transport)
    assert zlib.decompress(cap.delivery.body)  # really compressed on the wire
    message = decode(cap.delivery)
    assert (message.args, message.compression) == ([2, 3], "application/x-gzip")
    assert message.content_type == "application/json"


COMPRESSORS = {"zlib": zlib.compress, "bzip2": bz2.compress, "lzma": lzma.compress}
DECOMPRESSORS = {"zlib": zlib.decompress, "bzip2": bz2.decompress, "lzma": lzma.decompress}


def _compressed(codec: str, body: bytes | None = None) -> Delivery:
    """A task compressed with ``codec`` as Celery sends it (``body``: other compressed bytes
    in place of its own)."""
    message = encode_task("tasks.add", [2, 3], {}, SendOptions(compression=codec), origin="t@h")
    return make_delivery(message if body is None else dataclasses.replace(message, body=body))


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_a_compressed_body_may_expand_up_to_the_limit_and_not_beyond(codec: str) -> None:
    delivery = _compressed(codec)
    size = len(DECOMPRESSORS[codec](delivery.body))
    assert decode(delivery, max_decompressed=size).args == [2, 3]
    with pytest.raises(DecodeError) as refused:
        decode(delivery, max_decompressed=size - 1)
    assert str(refused.value) == (
        f"undecodable body: {delivery.headers['compression']} body expands to more than "
        f"{size - 1:,} bytes (the consumer's max_decompressed_bytes)"
    )


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_a_decompression_bomb_is_refused_without_being_expanded(codec: str) -> None:
    bomb = _compressed(codec, COMPRESSORS[codec](b" " * 30_000_000))  # 30 MB in a few kB
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="expands to more than 1,048,576 bytes"):
            decode(bomb, max_decompressed=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # the limit and the codec's state (xz: an 8 MiB dictionary), not 30 MB


def test_concatenated_bzip2_streams_decode_and_count_against_one_limit() -> None:
    plain = bz2.decompress(_compressed("bzip2").body)
    two = _compressed("bzip2", bz2.compress(plain[:10]) + bz2.compress(plain[10:]))
    assert decode(two).args == [2, 3]
    with pytest.raises(DecodeError, match="expands to more than"):
        decode(two, max_decompressed=len(plain) - 1)


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_bytes_after_the_compressed_stream_are_ignored_as_kombu_does(codec: str) -> None:
    whole = _compressed(codec).body
    padded = _compressed(codec, whole + b"trailing junk")
    assert DECOMPRESSORS[codec](padded.body) == DECOMPRESSORS[codec](whole)  # kombu's decoders
    assert decode(padded).args == [2, 3]


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_a_truncated_compressed_body_is_undecodable(codec: str) -> None:
    whole = _compressed(codec).body
    with pytest.raises(DecodeError, match="undecodable body: cannot decompress"):
        decode(_compressed(codec, whole[: len(whole) // 2]))


@pytest.mark.parametrize("cap", NOT_JSON, ids=lambda c: c.label)
def test_non_json_refused_unless_accepted(cap: Captured) -> None:
    name = {"application/x-msgpack": "msgpack", "application/x-yaml": "yaml",
            "application/x-python-serialize": "pickle"}[cap.delivery.content_type]
    with pytest.raises(ContentDisallowed) as refused:
        decode(cap.delivery)
    assert str(refused.value) == (
        f"content type {cap.delivery.content_type} ({name}) is not accepted; "
        f"allow it with accept_content=['json', '{name}']"
    )
    by_name = decode(cap.delivery, ("json", name))
    by_type = decode(cap.delivery, (cap.delivery.content_type,))
    assert by_name.args == by_type.args == [2, 3]
    assert by_name.kwargs == {"z": 1}


# ------------------------------------------------------- decode: hand-made and malformed input


def malformed(transport: str, case: str) -> Delivery:
    entry = load_json(f"{transport}/worker/malformed_messages.json")[case]
    if transport == "redis":
        return envelope_delivery(json.loads(entry["lpushed_raw"]))
    return amqp_delivery(entry["body"].encode(), entry["properties"])


@pytest.mark.parametrize(("transport", "case"), [
    ("redis", "handmade_valid_minimal_v2"), ("redis", "handmade_valid_few_headers"),
    ("redis", "body_not_a_3_tuple"), ("amqp", "v2_minimal_headers"), ("amqp", "v2_body_is_dict"),
])
def test_messages_a_real_worker_runs(transport: str, case: str) -> None:
    message = decode(malformed(transport, case))
    assert (message.name, message.args, message.kwargs) == ("sqapp.add", [1, 2], {})
    assert message.protocol == 2 and message.retries == 0 and message.eta is None


def test_minimal_headers_built_by_hand() -> None:
    body, content_type, encoding = dumps([[1], {"b": 2}, {}])
    message = decode(Delivery(body, content_type, encoding, {"task": "t.x", "id": "abc"}, {},
                              "q", False, None))
    assert (message.id, message.name, message.args, message.kwargs) == ("abc", "t.x", [1], {"b": 2})
    assert message.root_id is None and message.time_limit is None and message.ignore_result is False


def test_hybrid_body_keeps_dict_fields_and_headers_win() -> None:
    body, content_type, encoding = dumps({"args": [1], "kwargs": {"k": 2}, "retries": 7,
                                          "callbacks": [MUL_SIG], "chain": [MUL_SIG]})
    headers = {"task": "t.x", "id": "h1", "retries": 2}
    message = decode(Delivery(body, content_type, encoding, headers, {}, "q", False, None))
    assert (message.args, message.kwargs, message.retries) == ([1], {"k": 2}, 2)
    assert message.callbacks == [MUL_SIG] and message.chain is None  # as Celery's hybrid path


@pytest.mark.parametrize(("transport", "case", "error", "reason"), [
    ("redis", "unknown_content_type", ContentDisallowed, "application/x-unknown is not accepted"),
    ("redis", "pickle_body_json_header_mismatch", DecodeError, "undecodable body"),
    ("redis", "no_task_header_no_v1_body", DecodeError,
     "no task header and body is not a protocol v1 task"),
    ("amqp", "no_headers_not_json", DecodeError, "undecodable body"),
    ("amqp", "v2_bad_json_body", DecodeError, "undecodable body"),
    ("amqp", "unknown_content_type", ContentDisallowed, "is not accepted"),
    ("amqp", "no_content_type", DecodeError, "no content type"),
])
def test_messages_a_real_worker_drops(
    transport: str, case: str, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        decode(malformed(transport, case))


def test_envelope_error_is_a_decode_error() -> None:
    broken = Delivery(b"this is not json", "", "", {}, {}, "celery", False, None,
                      envelope_error="item is not JSON")
    with pytest.raises(DecodeError, match=r"^envelope: item is not JSON$"):
        decode(broken)


@pytest.mark.parametrize(("header", "value", "reason"), [
    ("eta", "tomorrow", "malformed header 'eta'"),
    ("expires", 12, "malformed header 'expires'"),
    ("timelimit", [1], "malformed header 'timelimit'"),
    ("timelimit", [-1, None], "malformed header 'timelimit'"),
    ("retries", "1", "malformed header 'retries'"),
    ("root_id", 5, "malformed header 'root_id'"),
    ("task", None, "malformed header 'task'"),
    ("id", "", "malformed header 'id'"),
    ("compression", "application/x-nope", "unknown compression"),
])
def test_malformed_headers_are_named(header: str, value: Any, reason: str) -> None:
    good = captured("send_task_basic").delivery
    bad = Delivery(good.body, good.content_type, good.content_encoding,
                   {**good.headers, header: value}, good.properties, "celery", False, None)
    with pytest.raises(DecodeError, match=reason):
        decode(bad)


# --------------------------------------------------------------------------------- encode


def full_options(now: datetime) -> SendOptions:
    """apply_async_full_options's call, as SendOptions."""
    return SendOptions(
        task_id="11111111-2222-3333-4444-555555555555", countdown=30, expires=120, priority=5,
        headers={"x-custom": "v", "tenant": "t1"}, callbacks=[MUL_SIG], errbacks=[ON_ERROR_SIG],
        time_limit=60, soft_time_limit=50, ignore_result=False,
    )


@pytest.mark.parametrize("transport", ["redis", "amqp", "sqs"])
def test_encode_task_writes_what_celery_writes(transport: str) -> None:
    real = captured("apply_async_full_options", transport)
    now = datetime(2026, 11, 23, 19, 2, 42, 150016, tzinfo=UTC)
    ours = encode_task("sqapp.add", (2, 3), {}, full_options(now), origin="gen12529@vm", now=now)
    assert list(ours.headers) == list(real.headers)  # same keys, same order
    assert {k: type(v) for k, v in ours.headers.items()} == {
        k: type(v) for k, v in real.headers.items()
    }
    same = set(real.headers) - {"eta", "expires", "origin"}
    assert {k: ours.headers[k] for k in same} == {k: real.headers[k] for k in same}
    assert ours.headers["eta"] == (now + timedelta(seconds=30)).isoformat()
    assert ours.headers["expires"] == (now + timedelta(seconds=120)).isoformat()
    assert set(ours.properties) == set(real.properties)
    assert {k: v for k, v in ours.properties.items() if k != "reply_to"} == {
        k: v for k, v in real.properties.items() if k != "reply_to"
    }
    assert (ours.content_type, ours.content_encoding) == ("application/json", "utf-8")
    assert json_body(ours) == load_json(f"{transport}/producer/apply_async_full_options.json")[
        "messages"][0]["body_decoded"]


@pytest.mark.parametrize("case", ["send_task_basic", "delay_basic", "apply_async_args_kwargs",
                                  "shadow_name", "stamped", "ignore_result"])
def test_encode_simple_calls_like_celery(case: str) -> None:
    real = captured(case)
    message = decode(real.delivery)
    options = SendOptions(
        task_id=message.id, ignore_result=real.headers["ignore_result"],
        shadow=real.headers["shadow"], stamped_headers=real.headers["stamped_headers"],
        stamps=real.headers["stamps"], reply_to=real.properties["reply_to"],
    )
    args = tuple(message.args)
    ours = encode_task(message.name, args, message.kwargs, options, origin=real.headers["origin"])
    assert ours.headers == real.headers
    assert ours.properties == real.properties
    assert json_body(ours) == json.loads(real.delivery.body)


def test_encode_float_countdown_and_expires() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ours = encode_task("t.x", (), {}, SendOptions(countdown=1.5, expires=10.25),
                       origin="o", now=now)
    assert ours.properties["expiration"] == "10250"
    assert ours.headers["eta"] == "2026-01-01T00:00:01.500000+00:00"
    assert ours.headers["expires"] == "2026-01-01T00:00:10.250000+00:00"


@pytest.mark.usefixtures("local_time_not_utc")
def test_encode_datetimes_naive_means_utc() -> None:
    now = datetime(2029, 12, 31, 12, 0, tzinfo=UTC)
    ours = encode_task("t.x", (), {}, SendOptions(eta=datetime(2030, 1, 1, 12, 0),
                                                   expires=datetime(2030, 1, 2, tzinfo=UTC)),
                       origin="o", now=now)
    assert ours.headers["eta"] == "2030-01-01T12:00:00+00:00"
    assert ours.headers["expires"] == "2030-01-02T00:00:00+00:00"
    assert ours.properties["expiration"] == str(36 * 3600 * 1000)
    past = encode_task("t.x", (), {}, SendOptions(expires=now - timedelta(seconds=5)),
                       origin="o", now=now)
    assert past.properties["expiration"] == "0"


def test_encode_compression_like_celery() -> None:
    real = captured("compression_zlib")
    ours = encode_task("sqapp.add", (2, 3), {}, SendOptions(compression="zlib"), origin="o")
    assert list(ours.headers) == list(real.headers)
    assert ours.headers["compression"] == "application/x-gzip"
    assert (ours.content_type, ours.content_encoding) == ("application/json", "utf-8")
    assert json.loads(zlib.decompress(ours.body)) == json.loads(zlib.decompress(real.delivery.body))


def test_encode_gives_fresh_uuid4_ids() -> None:
    first = encode_task("t.x", (), {}, SendOptions(), origin="o")
    second = encode_task("t.x", (), {}, SendOptions(), origin="o")
    assert first.headers["id"] != second.headers["id"]
    assert uuid.UUID(first.headers["id"]).version == 4
    assert first.headers["root_id"] == first.properties["correlation_id"] == first.headers["id"]


ROUND_TRIP_OPTIONS = SendOptions(
    task_id="rt-1", countdown=5, expires=60, priority=7, headers={"x-tenant": "a"},
    retries=2, root_id="root-1", parent_id="parent-1", group_id="g-1", group_index=3,
    ignore_result=True, time_limit=30, soft_time_limit=20.5, callbacks=[MUL_SIG],
    errbacks=[ON_ERROR_SIG], chain=[MUL_SIG, ON_ERROR_SIG], chord={**MUL_SIG, "chord_size": 2},
    reply_to="client-oid", shadow="nice.name", stamped_headers=["s"], stamps={"s": 1},
)


@pytest.mark.parametrize("serializer", ALL_SERIALIZERS)
@pytest.mark.parametrize("compression", [None, "zlib", "bzip2", "lzma"])
def test_round_trip(serializer: str, compression: str | None) -> None:
    now = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    args = (1, "two", [3.5, None], {"four": 4})
    rich = {"when": now, "amount": Decimal("1.10"), "blob": b"\xff"}  # kombu JSON and pickle
    kwargs = rich if serializer in ("json", "pickle") else {"k": "v", "blob": b"\xff"}
    options = SendOptions(**{**_fields(ROUND_TRIP_OPTIONS), "serializer": serializer,
                             "compression": compression})
    sent = encode_task("t.round", args, kwargs, options, origin="gen1@here", now=now)
    message = decode(delivery_of(sent), ALL_SERIALIZERS)
    assert (message.id, message.name, message.protocol) == ("rt-1", "t.round", 2)
    assert message.args == [1, "two", [3.5, None], {"four": 4}]
    assert message.kwargs == kwargs
    assert message.eta == now + timedelta(seconds=5)
    assert message.expires == now + timedelta(seconds=60)
    assert (message.retries, message.time_limit, message.soft_time_limit) == (2, 30, 20.5)
    assert (message.root_id, message.parent_id) == ("root-1", "parent-1")
    assert (message.group_id, message.group_index, message.ignore_result) == ("g-1", 3, True)
    assert (message.callbacks, message.errbacks) == ([MUL_SIG], [ON_ERROR_SIG])
    assert (message.chain, message.chord) == ([MUL_SIG, ON_ERROR_SIG], {**MUL_SIG, "chord_size": 2})
    assert message.properties == {"correlation_id": "rt-1", "reply_to": "client-oid",
                                  "delivery_mode": 2, "priority": 7, "expiration": "60000"}
    assert message.headers["x-tenant"] == "a" and message.headers["shadow"] == "nice.name"
    assert message.headers["stamps"] == {"s": 1}
    assert message.compression == (None if compression is None else sent.headers["compression"])


def _fields(options: SendOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in SendOptions.__dataclass_fields__}


@pytest.mark.parametrize(("options", "args", "reason"), [
    (SendOptions(serializer="nope"), (), "no serializer named 'nope'"),
    (SendOptions(compression="nope"), (), "unknown compression 'nope'"),
    (SendOptions(time_limit=10, soft_time_limit=20), (), "must not exceed time_limit"),
    (SendOptions(), (object(),), "cannot serialize with json"),
    (SendOptions(countdown=math.nan), (), "cannot build a message"),
    (SendOptions(expires=math.inf), (), "cannot build a message"),
])
def test_encode_errors(options: SendOptions, args: tuple[Any, ...], reason: str) -> None:
    with pytest.raises(EncodeError, match=reason):
        encode_task("t.x", args, {}, options, origin="o")


JSON_CAPTURES = [c for c in CAPTURED if c.delivery.content_type == "application/json"
                 and "compression" not in c.headers]


@pytest.mark.parametrize("body", [
    *(c.delivery.body for c in JSON_CAPTURES),
    b'[["\\u005f_type__"], {"d": {"\\u005f_type__": "decimal", "__value__": "1.5"}}, {}]',
    '["caf\u00e9", {"__type__": "uuid", "__value__": {"hex": "%s"}}]'.encode() % (b"0" * 32),
])
def test_json_decoding_is_exactly_kombus(body: bytes) -> None:
    expected = kombu_json.loads(body)  # type: ignore[no-untyped-call]
    assert loads(body, "application/json", "utf-8") == expected


def test_dumps_and_loads() -> None:
    data, content_type, encoding = dumps({"d": Decimal("2.5")}, "json")
    assert (content_type, encoding) == ("application/json", "utf-8")
    assert json.loads(data) == {"d": {"__type__": "decimal", "__value__": "2.5"}}
    assert loads(data, content_type, encoding) == {"d": Decimal("2.5")}
    packed = dumps([1, b"x"], "msgpack")
    assert packed[1:] == ("application/x-msgpack", "binary")
    with pytest.raises(ContentDisallowed, match="accept_content=\\['json', 'msgpack'\\]"):
        loads(*packed)
    assert loads(*packed, accept=("msgpack",)) == [1, b"x"]
    with pytest.raises(DecodeError, match="undecodable body"):
        loads(b"{", "application/json", "utf-8")


# ---------------------------------------------------------------------------------- retry


def test_retry_matches_a_real_celery_worker() -> None:
    original, first, second = monitor_pushes("redis/worker/monitor_retry_with_custom_headers.json")
    message = decode(envelope_delivery(original))
    for expected in (first, second):
        expires = datetime.fromisoformat(expected["headers"]["expires"])
        left_ms = int(expected["properties"]["expiration"])
        now = expires - timedelta(microseconds=left_ms * 1000 + 500)
        retried = encode_retry(message, eta=aware(expected["headers"]["eta"]) or now, now=now)
        assert list(retried.headers) == list(expected["headers"])
        assert retried.headers == expected["headers"]
        celery_properties = wire_properties(expected["properties"])
        # Celery's stray copy of the origin header as a property is deliberately not written
        assert celery_properties.pop("origin") == expected["headers"]["origin"]
        assert retried.properties == celery_properties
        assert json_body(retried) == json.loads(base64.b64decode(expected["body"]))
        message = decode(delivery_of(retried))  # retried again on the next round


def test_retry_matches_sqs_capture() -> None:
    real = load_json("sqs/worker/retry_republished_message.json")["messages"][0]["envelope"]
    before = copy.deepcopy(real)
    before["headers"].update(retries=0, parent_id=None, eta=None)
    message = decode(envelope_delivery(before))
    retried = encode_retry(message, eta=aware(real["headers"]["eta"]) or datetime.now(UTC))
    assert retried.headers == real["headers"]
    expected = wire_properties(real["properties"])
    expected.pop("origin")
    assert retried.properties == expected  # no expires: no expiration
    assert retried.body == base64.b64decode(real["body"])


def test_retry_keeps_serializer_compression_and_drops_broker_headers() -> None:
    cap = captured("compression_zlib")
    headers = {**cap.delivery.headers, "redelivered": True, "x-death": [{"count": 1}]}
    message = decode(Delivery(cap.delivery.body, cap.delivery.content_type, "utf-8", headers,
                              cap.delivery.properties, "celery", True, None))
    retried = encode_retry(message, eta=datetime.now(UTC))
    assert "redelivered" not in retried.headers and "x-death" not in retried.headers
    assert retried.headers["compression"] == "application/x-gzip"
    assert decode(delivery_of(retried)).args == [2, 3]
    pickled = decode(captured("serializer_pickle").delivery, ("pickle",))
    again = encode_retry(pickled, eta=datetime.now(UTC))
    assert again.content_type == "application/x-python-serialize"
    assert decode(delivery_of(again), ("pickle",)).kwargs == {"z": 1}


def test_retry_after_expiry_and_of_protocol1() -> None:
    message = decode(captured("protocol1_send_task").delivery)
    assert message.expires is not None
    retried = encode_retry(message, eta=message.expires, now=message.expires + timedelta(hours=1))
    assert retried.properties["expiration"] == "0"
    again = decode(delivery_of(retried))
    assert (again.protocol, again.id, again.retries) == (2, message.id, 1)
    assert (again.parent_id, again.root_id) == (message.id, message.id)
    assert (again.args, again.kwargs, again.expires) == ([2, 3], {"z": 1}, message.expires)


# ------------------------------------------------------------------------------ follow-ups


def session_push(task_id_prefix: str, task: str) -> dict[str, Any]:
    pushes = monitor_pushes("redis/worker/monitor_main_session.json")
    return next(p for p in pushes
                if p["headers"]["id"].startswith(task_id_prefix) and p["headers"]["task"] == task)


def test_link_callback_matches_a_real_celery_worker() -> None:
    parent = decode(envelope_delivery(session_push("be186543", "sqapp.add")))
    real = session_push("54a14d91", "sqapp.mul")
    assert parent.callbacks is not None
    queue, sent = encode_followup(parent.callbacks[0], parent, 5, origin="gen21970@vm")
    assert queue is None
    assert list(sent.headers) == list(real["headers"])
    assert {k: v for k, v in sent.headers.items() if k != "id"} == {
        k: v for k, v in real["headers"].items() if k != "id"
    }
    assert set(sent.properties) == set(wire_properties(real["properties"]))
    assert sent.properties["correlation_id"] == sent.headers["id"]
    assert json_body(sent) == json.loads(base64.b64decode(real["body"]))  # [[5, 10], {}, ...]


def test_chain_steps_match_a_real_celery_worker() -> None:
    message = decode(envelope_delivery(session_push("4fabdf38", "sqapp.add")))
    for step_id, task, result in (("01ba1068", "sqapp.mul", 3), ("52db28d4", "sqapp.add", 9)):
        real = session_push(step_id, task)
        assert message.chain
        queue, sent = encode_followup(message.chain[-1], message, result,
                                      origin="gen21970@vm", chain=message.chain[:-1])
        assert queue is None
        assert sent.headers == real["headers"]
        assert sent.properties == wire_properties(real["properties"])
        assert json_body(sent) == json.loads(base64.b64decode(real["body"]))
        message = decode(delivery_of(sent))
    assert message.chain == []  # the last step arrives with an empty chain


def test_followup_immutable_queue_and_options() -> None:
    parent = decode(captured("apply_async_full_options").delivery)
    signature = {"task": "t.next", "args": [1], "kwargs": {"k": 2}, "immutable": True,
                 "options": {"queue": "other", "task_id": "fixed", "countdown": 10,
                             "priority": 3, "link": MUL_SIG, "headers": {"h": 1}},
                 "subtask_type": None}
    queue, sent = encode_followup(signature, parent, "ignored", origin="o")
    message = decode(delivery_of(sent))
    assert queue == "other"
    assert (message.id, message.args, message.kwargs) == ("fixed", [1], {"k": 2})
    assert (message.parent_id, message.root_id) == (parent.id, parent.root_id)
    assert message.callbacks == [MUL_SIG] and message.headers["h"] == 1
    assert message.properties["priority"] == 3 and message.eta is not None


@pytest.mark.parametrize("signature", [
    {"task": "celery.group", "args": [], "kwargs": {"tasks": []}, "subtask_type": "group"},
    {"args": [1]},
    {"task": "t.x", "options": {"countdown": "soon"}},
])
def test_followup_refuses_what_it_cannot_send(signature: dict[str, Any]) -> None:
    parent = decode(captured("send_task_basic").delivery)
    with pytest.raises(EncodeError):
        encode_followup(signature, parent, 1, origin="o")


# ------------------------------------------------------------------------------------ fuzz


CONTENT_TYPES: list[Any] = ["application/json", "application/x-msgpack", "application/x-yaml",
                 "application/x-python-serialize", "application/x-unknown", "text/plain",
                 "application/data", "", None, 5]
WRONG_VALUES: list[Any] = [None, 0, -3, 1.5, math.nan, math.inf, "", "x", "2030-13-45",
                           [], [1], [None, None, None], ["a", "b"], {}, {"a": 1}, b"\xff",
                           True, ("t",), {"__type__": "nope", "__value__": 1}]


def check_outcome(delivery: Delivery, accept: tuple[str, ...]) -> None:
    """Decoding either gives a sane TaskMessage or raises DecodeError; retrying it is safe."""
    try:
        message = decode(delivery, accept)
    except DecodeError:  # ContentDisallowed included
        return
    assert isinstance(message, TaskMessage)
    assert type(message.id) is str and message.id and type(message.name) is str
    assert type(message.args) is list and type(message.kwargs) is dict
    assert all(type(key) is str for key in message.kwargs)
    for moment in (message.eta, message.expires):
        assert moment is None or moment.tzinfo is UTC
    assert type(message.retries) is int and type(message.ignore_result) is bool
    with contextlib.suppress(EncodeError):
        encode_retry(message, eta=datetime.now(UTC))


def test_random_bytes_only_raise_decode_errors() -> None:
    rng = random.Random(20261123)
    for _ in range(1000):
        body = rng.randbytes(rng.randint(0, 120))
        if rng.random() < 0.3:
            body = zlib.compress(body)
        headers = rng.choice([{}, {"task": "t.x", "id": "i"}, {"compression": "application/x-gzip"},
                              {"task": "t.x", "id": "i", "compression": "application/x-gzip"}])
        delivery = Delivery(body, rng.choice(CONTENT_TYPES), rng.choice(["utf-8", "binary", ""]),
                            headers, {}, "q", False, None)
        check_outcome(delivery, rng.choice([("json",), ALL_SERIALIZERS]))


def mutate(rng: random.Random, cap: Captured) -> Delivery:
    """A captured delivery with one to three structural mutations."""
    fields: dict[str, Any] = {
        "body": cap.delivery.body, "content_type": cap.delivery.content_type,
        "content_encoding": cap.delivery.content_encoding, "headers": dict(cap.delivery.headers),
        "properties": dict(cap.delivery.properties), "queue": "q", "redelivered": False,
        "token": None,
    }
    for _ in range(rng.randint(1, 3)):
        MUTATIONS[rng.randrange(len(MUTATIONS))](rng, fields, cap)
    return Delivery(**fields)


def _drop_header(rng: random.Random, fields: dict[str, Any], cap: Captured) -> None:
    if isinstance(fields["headers"], dict) and fields["headers"]:
        fields["headers"].pop(rng.choice(list(fields["headers"])))


def _wrong_header(rng: random.Random, fields: dict[str, Any], cap: Captured) -> None:
    if not isinstance(fields["headers"], dict):
        fields["headers"] = dict(cap.delivery.headers)
    keys = [*fields["headers"], "task", "id", "eta", "timelimit", "compression", "group_index"]
    fields["headers"][rng.choice(keys)] = copy.deepcopy(rng.choice(WRONG_VALUES))


def _truncate(rng: random.Random, fields: dict[str, Any], cap: Captured) -> None:
    fields["body"] = fields["body"][: rng.randrange(len(fields["body"]) + 1)]


def _flip_byte(rng: random.Random, fields: dict[str, Any], cap: Captured) -> None:
    body = bytearray(fields["body"] or b"\x00")
    body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    fields["body"] = bytes(body)


def _wrong_envelope(rng: random.Random, fields: dict[str, Any], cap: Captured) -> None:
    key = rng.choice(["content_type", "content_encoding", "headers", "properties"])
    fields[key] = rng.choice([*CONTENT_TYPES, None, [], "garbage", 7])


def _reshape_body(rng: random.Random, fields: dict[str, Any], cap: Captured) -> None:
    """Re-serialize the body as JSON with one part replaced by a wrong value."""
    body = copy.deepcopy(cap.body)
    if isinstance(body, dict):
        body[rng.choice(list(body))] = copy.deepcopy(rng.choice(WRONG_VALUES))
    elif rng.random() < 0.3:
        body = copy.deepcopy(rng.choice(WRONG_VALUES))
    else:
        body = list(body)
        part = rng.randrange(3)
        if part == 2 and isinstance(body[2], dict) and rng.random() < 0.7:
            body[2] = {**body[2], rng.choice(["callbacks", "errbacks", "chain", "chord"]):
                       copy.deepcopy(rng.choice(WRONG_VALUES))}
        else:
            body[part] = copy.deepcopy(rng.choice(WRONG_VALUES))
    fields["body"] = kombu_json.dumps(body).encode()  # type: ignore[no-untyped-call]
    fields["content_type"], fields["content_encoding"] = "application/json", "utf-8"
    if isinstance(fields["headers"], dict):
        fields["headers"].pop("compression", None)


MUTATIONS = [_drop_header, _wrong_header, _truncate, _flip_byte, _wrong_envelope, _reshape_body]


def test_mutated_envelopes_only_raise_decode_errors() -> None:
    rng = random.Random(1123)
    decoded = 0
    for _ in range(1000):
        cap = rng.choice(CAPTURED)
        delivery = mutate(rng, cap)
        try:
            decode(delivery, ALL_SERIALIZERS)
            decoded += 1
        except DecodeError:
            pass
        check_outcome(delivery, rng.choice([("json",), ALL_SERIALIZERS]))
    assert 50 < decoded < 950  # the mutations exercise both outcomes
