"""The RabbitMQ adapter: the shared contract, then what is AMQP's own: Celery's topology and
content headers byte for byte, header types a py-amqp consumer gets back, priorities, delay
queues, dead-letter exchange, coalesced acks, consumer_timeout, broker restarts.
Every test runs against the session's rabbitmq-server, on a vhost of its own."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import amqp  # type: ignore[import-untyped]
import pytest
from pamqp.commands import Basic

from serve_queue.adapters import open_adapter
from serve_queue.adapters._amqp_wire import encode_table, outgoing_properties
from serve_queue.adapters.rabbitmq import QueueBinding, RabbitMQAdapter, RPCResultBackend
from serve_queue.errors import BrokerUnavailable, ConfigurationError, EncodeError, TaskTimeout
from serve_queue.types import (
    Ack,
    BrokerAdapter,
    DeadLetter,
    Delivery,
    OutgoingMessage,
    Requeue,
)
from tests.adapters.contract import AdapterContract, Pump
from tests.servers import RabbitMQServer

FIXTURES = Path("/work/shared/fixtures/celery_wire/amqp")


class TestRabbitMQContract(AdapterContract):
    @pytest.fixture(autouse=True)
    def _broker(self, amqp_url: str) -> None:
        self.url = amqp_url

    def make_adapter(self, **overrides: Any) -> BrokerAdapter:
        return RabbitMQAdapter(self.url, **overrides)

    def adapter_spec(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
        return "serve_queue.adapters.rabbitmq:RabbitMQAdapter", {"url": self.url, **overrides}

    async def dead_letters(self, adapter: BrokerAdapter, queue: str) -> list[tuple[bytes, str]]:
        return [(body, str(headers.get("x-dead-letter-reason"))) for body, headers, _ in
                await browse(self.url, f"{queue}.dlq")]  # fmt: skip

    async def push_raw(self, queue: str, raw: bytes) -> None:
        """AMQP's unwrappable message: one without a content type (Celery's worker dies on it)."""
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True)  # as Celery and the adapter do
            underlay = await channel.get_underlay_channel()
            await underlay.basic_publish(raw, routing_key=queue, properties=Basic.Properties())
        finally:
            await connection.close()


# -- fixtures and helpers ---------------------------------------------------------------------


async def browse(url: str, queue: str) -> list[tuple[bytes, dict[str, Any], Any]]:
    """(body, headers, properties) of every message in ``queue``, left in place (basic.get
    without ack on a channel that is then closed, so the broker requeues them in order)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        out: list[tuple[bytes, dict[str, Any], Any]] = []
        try:
            while True:
                message = await raw.basic_get(queue, no_ack=False)
                if not isinstance(message.delivery, Basic.GetOk):
                    return out
                props = message.header.properties
                out.append((message.body, dict(props.headers or {}), props))
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return []
    finally:
        await connection.close()


@pytest.fixture
async def adapter(amqp_url: str) -> AsyncIterator[RabbitMQAdapter]:
    broker = RabbitMQAdapter(amqp_url)
    await broker.connect()
    yield broker
    await broker.close()



def pyamqp_channel(url: str) -> tuple[amqp.Connection, Any]:
    """A py-amqp (Celery's client) connection and channel on the vhost of ``url``."""
    rest = url.split("@", 1)[1]
    host, _, vhost = rest.partition("/")
    connection = amqp.Connection(host, userid="guest", password="guest", virtual_host=vhost or "/")
    connection.connect()
    return connection, connection.channel()


def queue_name(tag: str) -> str:
    return f"rq-{tag}-{uuid.uuid4().hex[:8]}"


def table_tags(data: bytes) -> dict[str, Any]:
    """Decode an AMQP field table keeping each value's type tag: ``{key: {tag: value}}``,
    the shape of ``_content_header_field_types.json``."""
    import struct

    def value(buf: bytes, pos: int) -> tuple[Any, int]:
        tag = chr(buf[pos])
        pos += 1
        if tag == "S":
            (n,) = struct.unpack_from(">I", buf, pos)
            return {"S": buf[pos + 4 : pos + 4 + n].decode()}, pos + 4 + n
        if tag == "V":
            return {"V": None}, pos
        if tag == "t":
            return {"t": bool(buf[pos])}, pos + 1
        if tag == "I":
            return {"I": struct.unpack_from(">i", buf, pos)[0]}, pos + 4
        if tag == "F":
            (n,) = struct.unpack_from(">I", buf, pos)
            return {"F": table_tags(buf[pos : pos + 4 + n])}, pos + 4 + n
        if tag == "A":
            (n,) = struct.unpack_from(">I", buf, pos)
            items, cur, end = [], pos + 4, pos + 4 + n
            while cur < end:
                item, cur = value(buf, cur)
                items.append(item)
            return {"A": items}, end
        raise AssertionError(f"unexpected type tag {tag!r}")

    (size,) = struct.unpack_from(">I", data, 0)
    out, pos = {}, 4
    while pos < 4 + size:
        klen = data[pos]
        key = data[pos + 1 : pos + 1 + klen].decode()
        out[key], pos = value(data, pos + 1 + klen)
    return out


def producer_fixtures() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((FIXTURES / "producer").glob("*.json")):
        if not path.name.startswith("_"):
            for message in json.loads(path.read_text())["messages"]:
                yield path.stem, message


# -- Celery's wire format, byte for byte ------------------------------------------------------


@pytest.mark.parametrize(("name", "message"), list(producer_fixtures()))
def test_content_header_is_byte_identical_to_celerys(name: str, message: dict[str, Any]) -> None:
    raw = bytes.fromhex(message["raw_content_header_frame_hex"])
    props = dict(message["properties"])
    outgoing = OutgoingMessage(
        b"", props.pop("content_type"), props.pop("content_encoding"),
        props.pop("application_headers"), props,
    )  # fmt: skip
    # class id, weight, body size (12 bytes), then property flags and properties
    assert outgoing_properties(outgoing).marshal() == raw[12:], name


def test_header_type_tags_match_what_py_amqp_writes() -> None:
    captured = json.loads((FIXTURES / "producer/_content_header_field_types.json").read_text())
    for path in sorted((FIXTURES / "producer").glob("[!_]*.json")):
        frames = captured["frames"][path.stem]
        messages = json.loads(path.read_text())["messages"]
        assert len(frames) == len(messages)
        for frame, message in zip(frames, messages, strict=True):
            ours = table_tags(encode_table(message["properties"]["application_headers"]))
            assert ours == frame["headers"], path.stem


async def test_a_py_amqp_consumer_gets_the_same_python_types(
    adapter: RabbitMQAdapter, amqp_url: str
) -> None:
    queue = queue_name("types")
    headers = {
        "lang": "py", "task": "tasks.add", "id": "t-1", "shadow": None, "eta": None,
        "retries": 0, "timelimit": [None, 1.5], "ignore_result": False, "group_index": 3,
        "stamped_headers": ["s"], "stamps": {"s": [1, None, "x"]}, "big": 2**40, "neg": -70000,
        "ratio": 0.1, "raw": b"\x00\xff", "tuple": (1, 2), "money": Decimal("1.25"),
    }  # fmt: skip
    props = {"correlation_id": "t-1", "reply_to": "r-1", "priority": 4, "expiration": "60000"}
    await adapter.publish(
        queue, OutgoingMessage(b"[[], {}, {}]", headers=headers, properties=props)
    )

    def read() -> Any:
        connection, channel = pyamqp_channel(amqp_url)
        try:
            return channel.basic_get(queue, no_ack=True)
        finally:
            connection.close()

    got = await asyncio.to_thread(read)
    received = got.properties["application_headers"]
    for key, sent in headers.items():
        want = list(sent) if isinstance(sent, tuple) else sent
        assert received[key] == want and type(received[key]) is type(want), key
    assert got.properties["content_type"] == "application/json"
    assert got.properties["delivery_mode"] == 2
    assert {k: got.properties[k] for k in props} == props


def test_unencodable_header_is_an_encode_error() -> None:
    with pytest.raises(EncodeError, match="'when'"):
        encode_table({"when": object()})
    with pytest.raises(EncodeError, match="64 bits"):
        encode_table({"n": 2**70})
    with pytest.raises(EncodeError, match="longer than 128"):
        encode_table({"k" * 200: 1})


# -- topology ---------------------------------------------------------------------------------


def vhost_of(url: str) -> str:
    return url.rsplit("/", 1)[1] or "/"


def listing(server: RabbitMQServer, url: str, what: str, *columns: str) -> list[tuple[str, ...]]:
    """Rows of ``rabbitmqctl list_<what> -p <vhost> <columns>``."""
    text = server.ctl(f"list_{what}", "-p", vhost_of(url), "--no-table-headers", *columns)
    return [tuple(line.split("\t")) for line in text.splitlines() if line.strip()]


async def test_topology_is_what_celery_declares(
    adapter: RabbitMQAdapter, amqp_url: str, rabbitmq_server: RabbitMQServer
) -> None:
    await adapter.publish("celery", OutgoingMessage(b"[[], {}, {}]"))
    queues = listing(rabbitmq_server, amqp_url, "queues", "name", "durable", "auto_delete",
                     "exclusive", "arguments")  # fmt: skip
    assert ("celery", "true", "false", "false", "[]") in queues
    exchanges = listing(rabbitmq_server, amqp_url, "exchanges", "name", "type", "durable")
    assert ("celery", "direct", "true") in exchanges
    bindings = listing(rabbitmq_server, amqp_url, "bindings", "source_name", "destination_name",
                       "routing_key")  # fmt: skip
    assert ("celery", "celery", "celery") in bindings
    ((_, _, props),) = await browse(amqp_url, "celery")
    assert props.delivery_mode == 2


async def test_topic_binding_publishes_through_the_exchange_like_celery(
    amqp_url: str, pumps: list[Pump]
) -> None:
    binding = QueueBinding("media", "topic", "media.video")
    adapter = RabbitMQAdapter(amqp_url, bindings={"video": binding})
    await adapter.connect()
    try:
        pumps.append(pump := Pump(adapter, ["video"], 5))
        await adapter.publish("video", OutgoingMessage(b"clip"))
        (delivery,) = await pump.take(1, 10, "routed through the topic exchange")
        assert delivery.properties["delivery_info"]["exchange"] == "media"
        assert delivery.properties["delivery_info"]["routing_key"] == "media.video"
        assert delivery.queue == "video"
        await adapter.settle(delivery, Ack())
    finally:
        await adapter.close()


async def test_redeclare_with_other_arguments_is_a_configuration_error(
    adapter: RabbitMQAdapter, amqp_url: str
) -> None:
    queue = queue_name("args")
    await adapter.publish(queue, OutgoingMessage(b"declared without x-max-priority"))
    other = RabbitMQAdapter(amqp_url, max_priority=10)
    await other.connect()
    try:
        with pytest.raises(ConfigurationError, match="x-max-priority"):
            await other.publish(queue, OutgoingMessage(b"x"))
        with pytest.raises(ConfigurationError, match="x-max-priority"):
            await other.deliveries([queue], 1).__anext__()
        # the broker closed that channel: the adapter opens another one and carries on
        await other.publish(queue_name("fine"), OutgoingMessage(b"ok"))
    finally:
        await other.close()
    assert (await adapter.depth(queue)).ready == 1


# -- delivery ---------------------------------------------------------------------------------


async def test_priority_nine_is_served_first(amqp_url: str, pumps: list[Pump]) -> None:
    queue = queue_name("prio")
    adapter = RabbitMQAdapter(amqp_url, max_priority=10)
    await adapter.connect()
    try:
        priorities = list(range(10)) * 2
        random.shuffle(priorities)
        for p in priorities:
            await adapter.publish(
                queue, OutgoingMessage(str(p).encode(), properties={"priority": p})
            )
        pumps.append(pump := Pump(adapter, [queue], 1))
        order = []
        for _ in priorities:
            (delivery,) = await pump.take(1, 10, "priority order")
            order.append(int(delivery.body))
            await adapter.settle(delivery, Ack())
        assert order == sorted(priorities, reverse=True)
    finally:
        await adapter.close()


async def test_message_without_content_type_is_yielded_and_dead_lettered(
    adapter: RabbitMQAdapter, amqp_url: str, pumps: list[Pump]
) -> None:
    queue = queue_name("noct")
    await adapter.publish(queue, OutgoingMessage(b"x"))  # declares it
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        props = Basic.Properties(headers={"task": "tasks.add", "id": "noct-1"})
        raw = await channel.get_underlay_channel()
        await raw.basic_publish(b"[[1,2],{},{}]", routing_key=queue, properties=props)
    finally:
        await connection.close()
    pumps.append(pump := Pump(adapter, [queue], 5))
    first, second = await pump.take(2, 10, "a real Celery worker crashes on this one; we must not")
    await adapter.settle(first, Ack())
    assert (second.content_type, second.content_encoding) == ("", "")
    assert second.headers == {"task": "tasks.add", "id": "noct-1"}
    await adapter.settle(second, DeadLetter("no content type"))
    (letter,) = await browse(amqp_url, f"{queue}.dlq")
    assert letter[0] == b"[[1,2],{},{}]"
    assert letter[1]["x-dead-letter-reason"] == "no content type"
    assert letter[1]["x-dead-letter-queue"] == queue
    assert letter[1]["task"] == "tasks.add"


async def test_coalesced_acks_never_cover_an_unsettled_delivery(
    adapter: RabbitMQAdapter, amqp_url: str, pumps: list[Pump]
) -> None:
    queue = queue_name("multi")
    bodies = [f"m-{i:02d}".encode() for i in range(40)]
    for body in bodies:
        await adapter.publish(queue, OutgoingMessage(body))
    pumps.append(pump := Pump(adapter, [queue], 40))
    got = await pump.take(40, 10, "all forty")
    keep = {got[3].body, got[17].body, got[39].body}
    await asyncio.gather(*(adapter.settle(d, Ack()) for d in got if d.body not in keep))
    await adapter.settle(got[17], Requeue())
    (again,) = await pump.take(1, 10, "the requeued one")
    assert again.body == got[17].body and again.redelivered
    await adapter.close()
    left = sorted(body for body, _, _ in await browse(amqp_url, queue))
    assert left == sorted(keep)


async def test_delay_rungs_let_a_short_delay_pass_a_longer_earlier_one(
    adapter: RabbitMQAdapter, pumps: list[Pump]
) -> None:
    queue = queue_name("rungs")
    for body in (b"long", b"short"):
        await adapter.publish(queue, OutgoingMessage(body))
    pumps.append(pump := Pump(adapter, [queue], 5))
    got = {d.body: d for d in await pump.take(2, 10, "both")}
    started = time.monotonic()
    await adapter.settle(got[b"long"], Requeue(delay_s=6.0))  # rung 8 s
    await adapter.settle(got[b"short"], Requeue(delay_s=0.5))  # rung 1 s
    depth = await adapter.depth(queue)
    assert (depth.ready, depth.reserved, depth.delayed) == (0, 0, 2)
    (first,) = await pump.take(1, 10, "the short delay")
    assert first.body == b"short" and time.monotonic() - started < 5.0
    assert first.headers["x-death"][0]["reason"] == "expired"
    await adapter.settle(first, Ack())
    (second,) = await pump.take(1, 15, "the long delay")
    assert second.body == b"long" and time.monotonic() - started >= 5.9
    await adapter.settle(second, Ack())


async def test_dead_letter_exchange_is_declared_when_asked(
    amqp_url: str, rabbitmq_server: RabbitMQServer, pumps: list[Pump]
) -> None:
    queue = queue_name("dlx")
    adapter = RabbitMQAdapter(
        amqp_url, dead_letter_exchange="sq.dlx", dead_letter_queue="dead.{queue}"
    )
    await adapter.connect()
    try:
        props = {"correlation_id": "c-1", "reply_to": "r", "expiration": "600000"}
        await adapter.publish(queue, OutgoingMessage(b"poison", headers={"id": "c-1"},
                                                     properties=props))  # fmt: skip
        pumps.append(pump := Pump(adapter, [queue], 1))
        (delivery,) = await pump.take(1, 10, "dead letter")
        await adapter.settle(delivery, DeadLetter("unknown-task: nope"))
    finally:
        await adapter.close()
    exchanges = listing(rabbitmq_server, amqp_url, "exchanges", "name", "type", "durable")
    assert ("sq.dlx", "direct", "true") in exchanges
    ((body, headers, props_),) = await browse(amqp_url, f"dead.{queue}")
    assert body == b"poison"
    assert headers == {"id": "c-1", "x-dead-letter-reason": "unknown-task: nope",
                       "x-dead-letter-queue": queue}  # fmt: skip
    assert (props_.correlation_id, props_.reply_to) == ("c-1", "r")
    assert props_.expiration is None, "a dead letter must not expire away"
    assert props_.delivery_mode == 2


async def test_depth_counts_this_adapters_reserved_only(
    adapter: RabbitMQAdapter, amqp_url: str, pumps: list[Pump]
) -> None:
    queue = queue_name("depth")
    for i in range(5):
        await adapter.publish(queue, OutgoingMessage(f"d{i}".encode()))
    other = RabbitMQAdapter(amqp_url)
    await other.connect()
    try:
        pumps.append(pump := Pump(other, [queue], 2))
        await pump.take(2, 10, "held by the other adapter")
        # AMQP reports ready messages only; each adapter adds what it holds itself
        assert (await adapter.depth(queue)).total == 3
        assert (await other.depth(queue)).total == 5
        assert (await adapter.depth(queue_name("missing"))).total == 0
    finally:
        await other.close()


# -- leases and consumer_timeout --------------------------------------------------------------


class LogWatch(logging.Handler):
    """Sets ``seen`` when a record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.seen = asyncio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.text in record.getMessage():
            self.seen.set()


async def test_held_deliveries_warn_before_consumer_timeout(
    amqp_url: str, pumps: list[Pump]
) -> None:
    queue = queue_name("ct")
    adapter = RabbitMQAdapter(amqp_url, visibility_timeout=None, consumer_timeout_s=1.0)
    watch = LogWatch("80% of RabbitMQ's consumer_timeout")
    logger = logging.getLogger("serve_queue.adapters.rabbitmq")
    logger.addHandler(watch)
    try:
        await adapter.connect()
        await adapter.publish(queue, OutgoingMessage(b"slow"))
        pumps.append(pump := Pump(adapter, [queue], 1))
        (delivery,) = await pump.take(1, 10, "held")
        started = time.monotonic()
        await asyncio.wait_for(watch.seen.wait(), 10)
        assert time.monotonic() - started >= 0.7, "warned too early"
        await pump.expect_quiet(0.5, "without a lease, a held delivery stays held")
        await adapter.settle(delivery, Ack())
        assert sum("consumer_timeout" in r.getMessage() for r in watch.records) == 1
    finally:
        logger.removeHandler(watch)
        await adapter.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_broker_consumer_timeout_closes_the_channel_and_the_adapter_recovers(
    amqp_url: str, rabbitmq_server: RabbitMQServer, pumps: list[Pump]
) -> None:
    queue = queue_name("bct")
    rabbitmq_server.set_consumer_timeout(2000)  # channels opened from now on
    try:
        adapter = RabbitMQAdapter(amqp_url, visibility_timeout=None, consumer_timeout_s=2.0)
        await adapter.connect()
        await adapter.publish(queue, OutgoingMessage(b"too slow"))
        pumps.append(pump := Pump(adapter, [queue], 1))
        (held,) = await pump.take(1, 10, "held past consumer_timeout")
        # RabbitMQ checks the timeout on its channel tick (about once a minute)
        (again,) = await pump.take(1, 120, "redelivered on a new channel")
    finally:
        rabbitmq_server.set_consumer_timeout(1_800_000)
    try:
        assert again.body == b"too slow" and again.redelivered
        await adapter.settle(held, Ack())  # its channel is gone: a no-op, not an ack of `again`
        await pump.expect_quiet(0.5, "nothing else")
        await adapter.settle(again, Ack())
        assert await wait_for_depth(adapter, queue, 0)
    finally:
        await adapter.close()


async def wait_for_depth(adapter: RabbitMQAdapter, queue: str, total: int) -> bool:
    deadline = time.monotonic() + 10
    while (await adapter.depth(queue)).total != total:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# -- connection loss --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_broker_restart_mid_run_loses_nothing(
    amqp_url: str, rabbitmq_server: RabbitMQServer, caplog: pytest.LogCaptureFixture
) -> None:
    queue, count = queue_name("restart"), 300
    adapter = RabbitMQAdapter(amqp_url, reconnect_window_s=90.0)
    await adapter.connect()
    caller = RPCResultBackend(amqp_url, reconnect_window_s=90.0)
    await caller.connect()
    waiting = asyncio.create_task(caller.wait("rpc-after-restart", timeout=200))
    sent = [f"r-{i:03d}".encode() for i in range(count)]
    late = [f"late-{i:02d}".encode() for i in range(30)]  # published while the broker restarts
    for start in range(0, count, 50):
        chunk = sent[start : start + 50]
        await asyncio.gather(*(adapter.publish(queue, OutgoingMessage(b)) for b in chunk))
    acked: set[bytes] = set()
    stale: list[Delivery] = []
    background: list[asyncio.Task[Any]] = []

    async def publish_late() -> None:
        for body in late:
            await adapter.publish(queue, OutgoingMessage(body))

    async def consume() -> None:
        while acked != set(sent) | set(late):
            try:
                async for delivery in adapter.deliveries([queue], 20):
                    if len(acked) >= 100 and not background:
                        stale.append(delivery)  # held across the restart: its channel dies
                        background.append(
                            asyncio.create_task(asyncio.to_thread(rabbitmq_server.restart))
                        )
                        background.append(asyncio.create_task(publish_late()))
                        continue
                    await adapter.settle(delivery, Ack())
                    acked.add(delivery.body)
                    if acked == set(sent) | set(late):
                        return
            except BrokerUnavailable:
                continue  # deliveries() waited reconnect_window_s: go on waiting

    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(consume(), 200)
        await asyncio.gather(*background)
        for delivery in stale:
            await adapter.settle(delivery, Ack())  # no-op: its tag means nothing on the new channel
    assert acked == set(sent) | set(late), "no message lost"
    assert "reconnected" in caplog.text
    assert "unknown delivery tag" not in caplog.text
    assert await wait_for_depth(adapter, queue, 0)
    await adapter.close()

    # the rpc backend listens again on its reply queue: a wait() begun before the restart ends
    await caller.get("anything")  # listening again (also done in the background)
    worker = RPCResultBackend(amqp_url)
    meta = {"status": "SUCCESS", "result": 1, "task_id": "rpc-after-restart"}
    await worker.store("rpc-after-restart", meta, reply_to=caller.reply_to)
    assert (await waiting)["result"] == 1
    await worker.close()
    await caller.close()


async def test_unreachable_broker_is_unavailable_without_the_password() -> None:
    from tests.servers import free_port

    adapter = RabbitMQAdapter(f"amqp://guest:s3cret@127.0.0.1:{free_port()}//",
                              reconnect_window_s=0.5)  # fmt: skip
    with pytest.raises(BrokerUnavailable) as info:
        await adapter.connect()
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(BrokerUnavailable):
        await adapter.publish("q", OutgoingMessage(b"x"))
    await adapter.close()


async def test_open_adapter_builds_it_from_amqp_and_pyamqp_urls(amqp_url: str) -> None:
    for url in (amqp_url, amqp_url.replace("amqp://", "pyamqp://", 1)):
        adapter = open_adapter(url, max_priority=None)
        assert isinstance(adapter, RabbitMQAdapter)
        await adapter.connect()
        await adapter.publish("celery", OutgoingMessage(b"x"))
        await adapter.close()
    with pytest.raises(ConfigurationError):
        RabbitMQAdapter(amqp_url, dead_letter_queue="{nope}")


async def test_an_abandoned_iterator_hands_back_and_closes_its_channel(
    adapter: RabbitMQAdapter, amqp_url: str, rabbitmq_server: RabbitMQServer
) -> None:
    queue = queue_name("abandon")
    for i in range(10):
        await adapter.publish(queue, OutgoingMessage(f"a{i}".encode()))
    iterator = adapter.deliveries([queue], 4)
    taken = [await iterator.__anext__() for _ in range(3)]  # 4 prefetched, 3 handed out
    await iterator.aclose()  # type: ignore[attr-defined]
    assert (await adapter.depth(queue)).ready == 7, "the unyielded one goes straight back"

    def channels() -> int:
        rows = listing(rabbitmq_server, amqp_url, "channels", "vhost", "number")
        return sum(1 for row in rows if row[0] == vhost_of(amqp_url))

    # the publisher's channel and the stopped session's (the depth probe's closed on a 404)
    assert channels() == 2
    for delivery in taken:
        await adapter.settle(delivery, Ack())
    deadline = time.monotonic() + 10
    while channels() > 1:
        assert time.monotonic() < deadline, "the stopped session's channel was never closed"
        await asyncio.sleep(0.1)
    assert (await adapter.depth(queue)).total == 7


# -- rpc:// result backend --------------------------------------------------------------------


async def test_rpc_results_go_to_the_reply_to_queue_and_never_regress(amqp_url: str) -> None:
    caller, worker = RPCResultBackend(amqp_url), RPCResultBackend(amqp_url)
    await caller.connect()
    await worker.connect()
    reply_to = caller.reply_to
    try:
        assert await caller.get("t-1") is None
        started = {"status": "STARTED", "result": None, "task_id": "t-1"}
        await worker.store("t-1", started, reply_to=reply_to)
        when = datetime(2030, 1, 1, tzinfo=timezone.utc)
        done = {"status": "SUCCESS", "result": {"n": [1, 2]}, "task_id": "t-1", "date_done": when}
        await worker.store("t-1", done, reply_to=reply_to)
        meta = await caller.wait("t-1", timeout=10)
        assert meta["result"] == {"n": [1, 2]}
        assert meta["date_done"] == when  # kombu JSON both ways
        await worker.store("t-1", started, reply_to=reply_to)  # a late STARTED
        await worker.store("t-2", {**done, "task_id": "t-2"}, reply_to=reply_to)
        await caller.wait("t-2", timeout=10)  # sent after the late STARTED of t-1
        assert (await caller.get("t-1") or {})["status"] == "SUCCESS", "a final state stays"
        with pytest.raises(TaskTimeout):
            await caller.wait("t-unknown", timeout=0.2)
        await worker.store("t-3", done, reply_to=None)  # nobody to tell: a logged no-op
    finally:
        await caller.close()
        await worker.close()


async def test_rpc_reply_has_celerys_properties(amqp_url: str) -> None:
    box = queue_name("reply")
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(box, durable=True)
    finally:
        await connection.close()
    worker = RPCResultBackend(amqp_url)
    try:
        await worker.store("t-9", {"status": "SUCCESS", "result": 5, "task_id": "t-9"},
                           reply_to=box)  # fmt: skip
    finally:
        await worker.close()
    ((body, headers, props),) = await browse(amqp_url, box)
    assert json.loads(body) == {"status": "SUCCESS", "result": 5, "task_id": "t-9"}
    assert headers == {}
    assert (props.correlation_id, props.delivery_mode, props.priority) == ("t-9", 1, 0)
    assert (props.content_type, props.content_encoding) == ("application/json", "utf-8")
    assert props.reply_to is None


async def test_quorum_queues_as_celery_declares_them(amqp_url: str, pumps: list[Pump]) -> None:
    queue = queue_name("quorum")  # task_default_queue_type="quorum" in Celery >= 5.5
    adapter = RabbitMQAdapter(amqp_url, queue_arguments={"x-queue-type": "quorum"})
    await adapter.connect()
    try:
        for body in (b"q1", b"q2"):
            await adapter.publish(queue, OutgoingMessage(body))
        pumps.append(pump := Pump(adapter, [queue], 2))  # per-consumer qos: quorum-safe
        got = {d.body: d for d in await pump.take(2, 10, "from a quorum queue")}
        await adapter.settle(got[b"q1"], Requeue())
        await adapter.settle(got[b"q2"], Requeue(delay_s=0.2))
        again = {d.body: d for d in await pump.take(2, 10, "both back")}
        assert again[b"q1"].redelivered
        for delivery in again.values():
            await adapter.settle(delivery, Ack())
        assert await wait_for_depth(adapter, queue, 0)
    finally:
        await adapter.close()


async def test_consumers_can_ask_for_their_own_consumer_timeout(
    amqp_url: str, rabbitmq_server: RabbitMQServer, pumps: list[Pump]
) -> None:
    queue = queue_name("askct")
    adapter = RabbitMQAdapter(amqp_url, consumer_timeout_s=7200.0, request_consumer_timeout=True)
    await adapter.connect()
    try:
        await adapter.publish(queue, OutgoingMessage(b"x"))
        pumps.append(pump := Pump(adapter, [queue], 1))
        (delivery,) = await pump.take(1, 10, "consuming")
        rows = listing(rabbitmq_server, amqp_url, "consumers", "queue_name", "arguments")
        assert (queue, '[{"x-consumer-timeout",7200000}]') in rows  # RabbitMQ >= 3.12 applies it
        await adapter.settle(delivery, Ack())
    finally:
        await adapter.close()
