"""The Redis adapter: the shared contract, then Redis/kombu wire compatibility and what is
Redis's own (priority lists, atomic fetch, kombu's unacked records, restore sweeps, staging,
coalesced settles, error translation). Every test runs against the session's redis-server."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from kombu import Connection  # type: ignore[attr-defined]

from serve_queue.adapters import open_adapter
from serve_queue.adapters.redis import RedisAdapter
from serve_queue.errors import BrokerError, BrokerUnavailable, ConfigurationError
from serve_queue.types import (
    Ack,
    BrokerAdapter,
    DeadLetter,
    Delivery,
    OutgoingMessage,
    QueueDepth,
    Requeue,
)
from tests.adapters.contract import AdapterContract, Pump
from tests.servers import free_port
from tests.unit.fixtures_util import FIXTURES as CELERY_FIXTURES

FIXTURES = CELERY_FIXTURES / "redis"
ROOT = Path(__file__).resolve().parents[2]
SEP = "\x06\x16"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def unwrap_dead_letter(record: bytes | str) -> tuple[bytes, bytes, dict[str, Any]]:
    """(original task body or raw item, original list item, the record) of one DLQ entry."""
    parsed = json.loads(record)
    if parsed.get("item_encoding") == "base64":
        item = base64.b64decode(parsed["item"])
    else:
        item = parsed["item"].encode("utf-8")
    try:
        body = base64.b64decode(json.loads(item)["body"])
    except (ValueError, KeyError, TypeError, RecursionError):
        body = item
    return body, item, parsed


class TestRedisContract(AdapterContract):
    @pytest.fixture(autouse=True)
    def _broker(self, redis_url: str) -> None:
        self.url = redis_url

    def make_adapter(self, **overrides: Any) -> BrokerAdapter:
        return RedisAdapter(self.url, **overrides)

    def adapter_spec(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
        return "serve_queue.adapters.redis:RedisAdapter", {"url": self.url, **overrides}

    async def dead_letters(self, adapter: BrokerAdapter, queue: str) -> list[tuple[bytes, str]]:
        client = aioredis.Redis.from_url(self.url)
        try:
            records = await client.lrange(f"{queue}.dlq", 0, -1)
        finally:
            await client.aclose()
        out = []
        for record in records:
            body, _, parsed = unwrap_dead_letter(record)
            out.append((body, parsed["reason"]))
        return out

    async def push_raw(self, queue: str, raw: bytes) -> None:
        client = aioredis.Redis.from_url(self.url)
        try:
            await client.lpush(queue, raw)
        finally:
            await client.aclose()


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
async def rc(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test DB, to look at (and tamper with) the keys."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def adapter(redis_url: str) -> AsyncIterator[RedisAdapter]:
    broker = RedisAdapter(redis_url, visibility_timeout=30.0)
    await broker.connect()
    yield broker
    await broker.close()



def pump(started: list[Pump], adapter: RedisAdapter, queue: str, prefetch: int = 100) -> Pump:
    started.append(Pump(adapter, [queue], prefetch))
    return started[-1]


def message(n: int, priority: int = 0, **headers: Any) -> OutgoingMessage:
    return OutgoingMessage(
        body=f"[[{n}], {{}}, {{}}]".encode(),
        headers={"task": "app.t", "id": f"id-{n}", "n": n, **headers},
        properties={"priority": priority, "correlation_id": f"id-{n}", "reply_to": "box"},
    )


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Poll ``probe`` every 20 ms until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := await probe()):
        assert time.monotonic() < deadline, f"still {value!r} after {timeout}s"
        await asyncio.sleep(0.02)
    return value


async def publish_many(adapter: RedisAdapter, queue: str, count: int) -> None:
    for first in range(0, count, 2000):
        await asyncio.gather(
            *(adapter.publish(queue, message(n)) for n in range(first, min(first + 2000, count)))
        )


# -- the envelope on the wire -----------------------------------------------------------------


async def test_published_item_has_the_kombu_envelope_shape(
    adapter: RedisAdapter, rc: aioredis.Redis
) -> None:
    expected = json.loads(fixture_bytes("producer/send_task_basic.0.raw.json"))
    await adapter.publish("celery", message(7, headers={"lang": "py"}))
    (raw,) = await rc.lrange("celery", 0, -1)
    item = json.loads(raw)
    assert set(item) == set(expected)
    assert {k: type(v) for k, v in item.items()} == {k: type(v) for k, v in expected.items()}
    assert set(item["properties"]) == set(expected["properties"])
    for key, value in expected["properties"].items():
        assert type(item["properties"][key]) is type(value), key
    assert base64.b64decode(item["body"]) == b"[[7], {}, {}]"
    assert item["content-type"] == "application/json"
    assert item["content-encoding"] == "utf-8"
    assert item["headers"]["n"] == 7
    props = item["properties"]
    assert props["body_encoding"] == "base64"
    assert props["delivery_info"] == {"exchange": "", "routing_key": "celery"}
    assert props["priority"] == 0
    assert uuid.UUID(props["delivery_tag"]).version == 4


async def test_priority_goes_to_kombu_priority_lists(
    adapter: RedisAdapter, rc: aioredis.Redis
) -> None:
    for priority in range(10):
        await adapter.publish("q", message(priority, priority=priority))
    lists = {key: await rc.llen(key) for key in ("q", f"q{SEP}3", f"q{SEP}6", f"q{SEP}9")}
    assert lists == {"q": 3, f"q{SEP}3": 3, f"q{SEP}6": 3, f"q{SEP}9": 1}
    (top,) = await rc.lrange(f"q{SEP}9", 0, -1)
    assert json.loads(top)["properties"]["priority"] == 9


async def test_kombu_consumes_what_we_publish(adapter: RedisAdapter, redis_url: str) -> None:
    await adapter.publish("kq", message(1, priority=4, custom="x"))

    def kombu_get() -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        with Connection(redis_url) as conn:  # type: ignore[no-untyped-call]
            simple = conn.SimpleQueue("kq")
            try:
                got = simple.get(timeout=5)
                got.ack()
                return got.body, got.headers, got.properties
            finally:
                simple.close()

    body, headers, properties = await asyncio.to_thread(kombu_get)
    assert body == b"[[1], {}, {}]"
    assert headers["custom"] == "x"
    assert properties["priority"] == 4
    assert properties["correlation_id"] == "id-1"


# -- consuming --------------------------------------------------------------------------------


async def test_priority_zero_first_then_fifo_within_a_list(
    adapter: RedisAdapter, pumps: list[Pump]
) -> None:
    order = [(1, 9), (2, 0), (3, 3), (4, 6), (5, 1), (6, 5), (7, 9), (8, 0)]
    for n, priority in order:
        await adapter.publish("pq", message(n, priority=priority))
    got = await pump(pumps, adapter, "pq").take(len(order), 10, "priority")
    assert [d.headers["n"] for d in got] == [2, 5, 8, 3, 6, 4, 1, 7]
    assert {d.queue for d in got} == {"pq"}, "the \\x06\\x16N suffix is not part of the queue"


async def test_fifo_over_a_long_queue(adapter: RedisAdapter, pumps: list[Pump]) -> None:
    await publish_many(adapter, "fifo", 1500)
    got = await pump(pumps, adapter, "fifo", prefetch=2000).take(1500, 20, "fifo")
    assert [d.headers["n"] for d in got] == list(range(1500))


async def test_celery_produced_items_are_consumed(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    basic = fixture_bytes("producer/send_task_basic.0.raw.json")
    prio = fixture_bytes("producer/priority_3.0.raw.json")
    await rc.lpush("celery", basic)
    await rc.lpush(f"celery{SEP}3", prio)
    first, second = await pump(pumps, adapter, "celery").take(2, 10, "celery items")
    envelope = json.loads(basic)
    assert first.body == base64.b64decode(envelope["body"])
    assert first.headers == envelope["headers"]
    assert first.properties == envelope["properties"]
    assert (first.content_type, first.content_encoding) == ("application/json", "utf-8")
    assert (first.queue, first.redelivered, first.envelope_error) == ("celery", False, None)
    assert second.headers["id"] == json.loads(prio)["headers"]["id"]
    assert second.queue == "celery"
    # recorded in flight the way a Celery worker records it
    tag = envelope["properties"]["delivery_tag"]
    value = json.loads(await rc.hget("unacked", tag) or b"null")
    assert value == [envelope, "", "celery"]
    await adapter.settle(first, Ack())
    await adapter.settle(second, Ack())
    assert await rc.hlen("unacked") == 0
    assert await rc.zcard("unacked_index") == 0


async def test_fetch_records_in_flight_in_the_same_step(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    await publish_many(adapter, "atomic", 20)
    before = time.time()
    got = await pump(pumps, adapter, "atomic", prefetch=20).take(20, 10, "atomic")
    assert await rc.llen("atomic") == 0
    assert await rc.hlen("unacked") == 20
    for delivery in got:
        tag = delivery.properties["delivery_tag"]
        stored = json.loads(await rc.hget("unacked", tag) or b"null")
        assert stored[1:] == ["", "atomic"]
        assert stored[0]["properties"]["delivery_tag"] == tag
        score = await rc.zscore("unacked_index", tag)
        assert score is not None and before - 1 <= score <= time.time() + 1


async def test_duplicate_delivery_tags_are_both_kept_in_flight(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    raw = fixture_bytes("producer/send_task_basic.0.raw.json")
    await rc.lpush("dup", raw, raw)
    first, second = await pump(pumps, adapter, "dup").take(2, 10, "duplicates")
    assert await rc.hlen("unacked") == 2, "a second record must not overwrite the first"
    await adapter.settle(first, Ack())
    await adapter.settle(second, Ack())
    assert await rc.hlen("unacked") == 0


@pytest.mark.parametrize("path", ["fetched", "staged"])
async def test_malformed_items_are_yielded_and_dead_lettered_raw(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump], path: str
) -> None:
    bad_body = fixture_json("worker/malformed_messages.json")["envelope_body_not_base64"]
    items = [
        b"\xff\xfe not json at all",
        b'{"body": "e30=", "headers": {}}',
        b'{"body": "e30=", "properties": {"body_encoding": "base64"}}',
        b"[1, 2, 3]",
        bad_body["lpushed_raw"].encode(),
    ]
    if path == "fetched":  # on the list before the consumer looks: taken by the fetch script
        for item in items:
            await rc.lpush("junk", item)
        got = await pump(pumps, adapter, "junk").take(len(items), 10, "malformed")
    else:  # pushed while it waits: each one staged by its BLMOVE, then claimed
        stream = pump(pumps, adapter, "junk")
        got = []
        for item in items:
            await stream.expect_quiet(0.1, "nothing pushed yet")
            await rc.lpush("junk", item)
            got += await stream.take(1, 10, "malformed, staged")

        async def all_claimed() -> bool:  # claims go out with the next pipeline
            return await rc.hlen("serve_queue.unacked_raw") + await rc.hlen("unacked") == 5

        await eventually(all_claimed)
    assert [d.body for d in got] == items
    assert all(d.envelope_error for d in got), [d.envelope_error for d in got]
    assert await adapter.depth("junk") == QueueDepth(ready=0, reserved=5, delayed=0)
    for delivery in got:
        await adapter.settle(delivery, DeadLetter(f"bad: {delivery.envelope_error}"))
    records = [unwrap_dead_letter(r) for r in await rc.lrange("junk.dlq", 0, -1)]
    assert sorted(item for _, item, _ in records) == sorted(items)
    assert all(rec["queue"] == "junk" and rec["reason"].startswith("bad: ") for *_, rec in records)
    assert [rec.get("item_encoding") for _, item, rec in records if item == items[0]] == ["base64"]
    assert await adapter.depth("junk") == QueueDepth(0, 0, 0)
    assert await rc.hlen("serve_queue.unacked_raw") == await rc.hlen("unacked") == 0


async def test_malformed_items_are_restored_raw(redis_url: str, rc: aioredis.Redis) -> None:
    victim = RedisAdapter(redis_url, visibility_timeout=0.5)
    await victim.connect()
    await rc.lpush("raw", b"\x00garbage")
    stream = victim.deliveries(["raw"], 5)
    delivery = await stream.__anext__()
    assert delivery.envelope_error and await rc.llen("raw") == 0
    # the iterator's own restore sweep gives it back once it is older than the timeout
    await eventually(lambda: rc.llen("raw"))
    assert await rc.lrange("raw", 0, -1) == [b"\x00garbage"]
    assert await rc.hlen("serve_queue.unacked_raw") == 0
    await victim.settle(delivery, Ack())  # too late: the sweep gave it back, the ack is moot
    assert await rc.llen("raw") == 1
    await stream.aclose()  # type: ignore[attr-defined]
    await victim.close()


# -- settling ---------------------------------------------------------------------------------


async def test_concurrent_settles_share_one_round_trip(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    await publish_many(adapter, "co", 300)
    got = await pump(pumps, adapter, "co", prefetch=300).take(300, 10, "coalesce")
    await rc.config_resetstat()
    await asyncio.gather(*(adapter.settle(d, Ack()) for d in got))
    stats = await rc.info("commandstats")
    assert stats["cmdstat_hdel"]["calls"] == 1
    assert stats["cmdstat_zrem"]["calls"] == 1
    assert await rc.hlen("unacked") == 0


async def test_requeue_goes_to_the_back_marked_redelivered(
    adapter: RedisAdapter, rc: aioredis.Redis
) -> None:
    for n in range(3):
        await adapter.publish("rq", message(n))
    stream = adapter.deliveries(["rq"], 1)
    first = await stream.__anext__()
    await adapter.settle(first, Requeue())
    order = []
    for _ in range(3):
        delivery = await stream.__anext__()
        order.append((delivery.headers["n"], delivery.redelivered))
        await adapter.settle(delivery, Ack())
    assert order == [(1, False), (2, False), (0, True)]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_delayed_requeue_is_parked_then_put_first(
    adapter: RedisAdapter, rc: aioredis.Redis
) -> None:
    await adapter.publish("dq", message(0, priority=3))
    stream = adapter.deliveries(["dq"], 10)
    parked = await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    due = time.time() + 0.3
    await adapter.settle(parked, Requeue(delay_s=0.3))
    assert await rc.zcard("serve_queue.delayed.dq") == 1
    assert await adapter.depth("dq") == QueueDepth(ready=0, reserved=0, delayed=1)
    assert await rc.hlen("unacked") == 0, "a parked message is not held in flight"
    for n in (1, 2):
        await adapter.publish("dq", message(n, priority=3))
    await asyncio.sleep(max(due - time.time(), 0) + 0.05)
    stream = adapter.deliveries(["dq"], 10)
    got = [await stream.__anext__() for _ in range(3)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert [(d.headers["n"], d.redelivered) for d in got] == [(0, True), (1, False), (2, False)]
    assert await rc.zcard("serve_queue.delayed.dq") == 0


async def test_dead_letter_is_one_record_with_the_original_item(
    redis_url: str, rc: aioredis.Redis
) -> None:
    broker = RedisAdapter(redis_url, dead_letter_queue="dead.{queue}")
    await broker.connect()
    await rc.lpush("dl", fixture_bytes("producer/send_task_basic.0.raw.json"))
    stream = broker.deliveries(["dl"], 1)
    delivery = await stream.__anext__()
    await broker.settle(delivery, DeadLetter("unknown task"))
    (record,) = await rc.lrange("dead.dl", 0, -1)
    _, item, parsed = unwrap_dead_letter(record)
    assert item == fixture_bytes("producer/send_task_basic.0.raw.json")
    assert (parsed["reason"], parsed["queue"]) == ("unknown task", "dl")
    assert abs(parsed["dead_lettered_at"] - time.time()) < 60
    assert await rc.hlen("unacked") == 0
    await stream.aclose()  # type: ignore[attr-defined]
    await broker.close()


# -- leases and restore -----------------------------------------------------------------------


async def test_extend_sets_the_score_kombu_compares(
    redis_url: str, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    broker = RedisAdapter(redis_url, visibility_timeout=10.0)
    await broker.connect()
    await broker.publish("lease", message(1))
    (delivery,) = await pump(pumps, broker, "lease").take(1, 10, "lease")
    tag = delivery.properties["delivery_tag"]
    before = time.time()
    await broker.extend(delivery, 25.0)
    score = await rc.zscore("unacked_index", tag)
    assert score is not None and before + 15 - 1 <= score <= time.time() + 15 + 1
    await broker.settle(delivery, Ack())
    await broker.extend(delivery, 25.0)  # settled: no-op, no index entry comes back
    assert await rc.zscore("unacked_index", tag) is None
    await pumps.pop().stop()
    await broker.close()


async def test_restore_sweep_renews_nothing_it_should_not(
    redis_url: str, rc: aioredis.Redis
) -> None:
    broker = RedisAdapter(redis_url, visibility_timeout=0.5)
    await broker.connect()
    await broker.publish("sw", message(1))
    await broker.publish("sw", message(2))
    stream = broker.deliveries(["sw"], 2)
    kept, dropped = await stream.__anext__(), await stream.__anext__()
    deadline = time.time() + 1.5
    while time.time() < deadline:  # keep one lease alive for three timeouts
        await broker.extend(kept, 0.5)
        await asyncio.sleep(0.1)
    # meanwhile the iterator's restore sweep (every 0.125 s) gave back the other one only
    (back,) = await rc.lrange("sw", 0, -1)
    envelope = json.loads(back)
    assert envelope["headers"]["n"] == dropped.headers["n"]
    assert envelope["headers"]["redelivered"] is True
    assert envelope["properties"]["delivery_info"]["redelivered"] is True
    assert await rc.hexists("unacked", kept.properties["delivery_tag"])
    await stream.aclose()  # type: ignore[attr-defined]
    await broker.close()


async def test_sweep_restores_records_a_celery_worker_left(
    adapter: RedisAdapter, rc: aioredis.Redis
) -> None:
    keys = fixture_json("worker/keyspace_db0_unacked_during_acks_late_and_eta.json")["keys"]
    await rc.hset("unacked", mapping=keys["unacked"]["value"])
    await rc.zadd("unacked_index", {tag: score for tag, score in keys["unacked_index"]["value"]})
    # the capture's clock is not ours: age the records so that they are overdue here
    await rc.zadd("unacked_index", {tag: 1.0 for tag in keys["unacked"]["value"]})
    assert await adapter.restore_expired() == 2
    restored = [json.loads(item) for item in await rc.lrange("celery", 0, -1)]
    originals = [json.loads(v)[0] for v in keys["unacked"]["value"].values()]
    assert sorted(r["headers"]["id"] for r in restored) == sorted(
        o["headers"]["id"] for o in originals
    )
    for item in restored:
        assert item["headers"]["redelivered"] is True
        assert item["properties"]["delivery_info"]["redelivered"] is True
    assert await rc.hlen("unacked") == await rc.zcard("unacked_index") == 0
    assert await rc.exists("unacked_mutex") == 0, "the mutex is released"


async def test_sweep_follows_kombu_bindings_of_a_named_exchange(
    adapter: RedisAdapter, rc: aioredis.Redis
) -> None:
    envelope = json.loads(fixture_bytes("producer/priority_6.0.raw.json"))
    await rc.sadd("_kombu.binding.tasks", f"urgent{SEP}{SEP}fast")
    await rc.hset("unacked", "t1", json.dumps([envelope, "tasks", "urgent"]))
    await rc.hset("unacked", "t2", json.dumps([envelope, "tasks", "unbound"]))
    await rc.zadd("unacked_index", {"t1": 1.0, "t2": 1.0})
    assert await adapter.restore_expired() == 2
    assert await rc.llen(f"fast{SEP}6") == 1, "routed like kombu: binding, then priority list"
    assert await rc.llen(f"unbound{SEP}6") == 1, "no binding: the routing key names the queue"


async def test_sweep_respects_a_held_mutex(adapter: RedisAdapter, rc: aioredis.Redis) -> None:
    await rc.hset("unacked", "t", json.dumps([{"properties": {}}, "", "q"]))
    await rc.zadd("unacked_index", {"t": 1.0})
    await rc.set("unacked_mutex", "a-celery-worker", px=5000)
    assert await adapter.restore_expired() == 0
    assert await rc.hexists("unacked", "t")
    await rc.delete("unacked_mutex")
    assert await adapter.restore_expired() == 1


async def test_kombu_restores_what_we_hold(
    adapter: RedisAdapter, rc: aioredis.Redis, redis_url: str
) -> None:
    await adapter.publish("kr", message(1))
    stream = adapter.deliveries(["kr"], 1)
    delivery = await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    assert await rc.llen("kr") == 0  # the iterator had yielded it: still ours, in flight

    def kombu_sweep() -> None:
        options = {"visibility_timeout": 0}
        with Connection(redis_url, transport_options=options) as conn:  # type: ignore[no-untyped-call]
            conn.default_channel.qos.restore_visible(num=100, interval=1)

    await asyncio.to_thread(kombu_sweep)
    (item,) = await rc.lrange("kr", 0, -1)
    envelope = json.loads(item)
    assert envelope["headers"]["n"] == 1
    assert envelope["headers"]["redelivered"] is True
    await adapter.settle(delivery, Ack())  # a late ack of a restored message changes nothing
    assert await rc.llen("kr") == 1


async def test_killed_consumer_comes_back_redelivered(
    redis_url: str, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    broker = RedisAdapter(redis_url, visibility_timeout=2.0)
    await broker.connect()
    for n in range(5):
        await broker.publish("kill", message(n))
    spec = {
        "target": "serve_queue.adapters.redis:RedisAdapter",
        "kwargs": {"url": redis_url, "visibility_timeout": 2.0},
        "queue": "kill",
        "count": 3,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.adapters._crash_consumer", cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    held = [await asyncio.wait_for(proc.stdout.readline(), 30) for _ in range(3)]
    proc.kill()
    await proc.wait()
    assert len(held) == 3 and await rc.hlen("unacked") == 3 and await rc.llen("kill") == 2
    survivor = pump(pumps, broker, "kill", prefetch=10)
    got: list[Delivery] = []
    while len(got) < 5:  # acknowledged at once: the survivor has the same short lease
        got += await survivor.take(1, 20, f"after the kill, {len(got)} of 5")
        await broker.settle(got[-1], Ack())
    assert sorted(d.headers["n"] for d in got) == [0, 1, 2, 3, 4]
    assert sorted(d.headers["n"] for d in got if d.redelivered) == [0, 1, 2]
    await pumps.pop().stop()
    await broker.close()


# -- waiting, staging, prefetch, close ---------------------------------------------------------


async def test_idle_consumer_wakes_up_on_publish(adapter: RedisAdapter, pumps: list[Pump]) -> None:
    idle = pump(pumps, adapter, "wake")
    await idle.expect_quiet(0.3, "nothing was published yet")
    await adapter.publish("wake", message(1))
    (delivery,) = await idle.take(1, 10, "published while waiting")
    assert delivery.headers["n"] == 1


async def test_a_dead_consumers_staged_item_goes_back_to_the_front(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    for n in range(3):
        await adapter.publish("st", message(n))
    # a consumer killed right after its BLMOVE leaves the oldest item in its staging list,
    # registered until shortly after its death
    staging = "serve_queue.staging.st.deadbeef0000"
    await rc.lmove("st", staging, "RIGHT", "LEFT")
    await rc.zadd("serve_queue.stagings", {f"2:st{staging}": time.time() + 1.0})
    assert await adapter.depth("st") == QueueDepth(ready=3, reserved=0, delayed=0)
    stream = pump(pumps, adapter, "st")
    got = await stream.take(2, 10, "the items still on the list")
    assert [d.headers["n"] for d in got] == [1, 2]
    await stream.expect_quiet(0.3, "an item staged by a consumer whose registration holds")

    await asyncio.sleep(1.0)  # the registration expires
    await adapter.restore_expired()  # the adapter's own sweeper may have got there first
    (item,) = await stream.take(1, 10, "the staged item, put back")
    assert item.headers["n"] == 0
    assert await rc.llen(staging) == 0
    assert f"2:st{staging}".encode() not in await rc.zrange("serve_queue.stagings", 0, -1)


async def test_an_idle_consumer_records_the_item_it_woke_for(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    idle = pump(pumps, adapter, "claim")
    await idle.expect_quiet(0.3, "nothing was published yet")
    await adapter.publish("claim", message(7))
    (delivery,) = await idle.take(1, 10, "published while waiting")

    async def recorded() -> bool:
        return await rc.hlen("unacked") == 1 and await rc.zcard("unacked_index") == 1

    assert await eventually(recorded)
    staged = [k for k in await rc.keys("serve_queue.staging.claim.*") if await rc.llen(k)]
    assert staged == []
    assert await adapter.depth("claim") == QueueDepth(ready=0, reserved=1, delayed=0)
    await adapter.settle(delivery, Ack())
    assert await rc.hlen("unacked") == 0 and await rc.zcard("unacked_index") == 0


async def test_close_puts_back_what_its_wait_staged(redis_url: str, rc: aioredis.Redis) -> None:
    waiter = RedisAdapter(redis_url)
    await waiter.connect()
    stream = waiter.deliveries(["park"], 1)
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.3)  # blocked in BLMOVE on its own staging list
    staging = [k.decode() for k in await rc.zrange("serve_queue.stagings", 0, -1)]
    assert len(staging) == 1 and staging[0].startswith("4:parkserve_queue.staging.park.")
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await rc.lpush("park", b"raw item")  # lands on the list or in staging, then back on close
    await waiter.close()
    assert await rc.lrange("park", 0, -1) == [b"raw item"]
    assert await rc.zcard("serve_queue.stagings") == 0


async def test_prefetch_bound_holds_over_a_large_backlog(
    adapter: RedisAdapter, rc: aioredis.Redis, pumps: list[Pump]
) -> None:
    await publish_many(adapter, "big", 10_000)
    stream = pump(pumps, adapter, "big", prefetch=50)
    held = await stream.take(50, 10, "the first window")
    await stream.expect_quiet(0.3, "a 51st unsettled delivery")
    assert await rc.hlen("unacked") == 50 and await rc.llen("big") == 9_950
    seen = 50
    while seen < 10_000:
        await asyncio.gather(*(adapter.settle(d, Ack()) for d in held))
        held = await stream.take(min(50, 10_000 - seen), 10, f"after {seen}")
        assert await rc.hlen("unacked") <= 50
        seen += len(held)
    assert await adapter.depth("big") == QueueDepth(ready=0, reserved=50, delayed=0)


async def test_close_hands_back_a_thousand_prefetched(redis_url: str, rc: aioredis.Redis) -> None:
    busy = RedisAdapter(redis_url)
    await busy.connect()
    await publish_many(busy, "warm", 1000)
    stream = busy.deliveries(["warm"], 1000)
    got = [await stream.__anext__() for _ in range(1000)]
    for delivery in got[:10]:
        await busy.settle(delivery, Ack())
    await busy.close()
    assert await rc.llen("warm") == 990 and await rc.hlen("unacked") == 0
    await busy.settle(got[500], Ack())  # handed back: a no-op
    assert await rc.llen("warm") == 990
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    fresh = RedisAdapter(redis_url)
    await fresh.connect()
    again = fresh.deliveries(["warm"], 1000)
    back = [await again.__anext__() for _ in range(990)]
    assert [d.headers["n"] for d in back] == list(range(10, 1000)), "original order kept"
    assert all(d.redelivered for d in back)
    await again.aclose()  # type: ignore[attr-defined]
    await fresh.close()


async def test_abandoned_iterator_gives_back_what_it_did_not_yield(
    adapter: RedisAdapter, rc: aioredis.Redis
) -> None:
    await publish_many(adapter, "ab", 20)
    stream = adapter.deliveries(["ab"], 20)
    first = await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    assert await rc.llen("ab") == 19 and await rc.hlen("unacked") == 1
    await adapter.settle(first, Ack())


# -- depth, options, errors -------------------------------------------------------------------


async def test_depth_counts_only_this_queue(adapter: RedisAdapter, rc: aioredis.Redis) -> None:
    for n, priority in enumerate((0, 0, 4, 9)):
        await adapter.publish("dp", message(n, priority=priority))
    await adapter.publish("other", message(9))
    stream = adapter.deliveries(["dp"], 2)
    first = await stream.__anext__()
    await stream.__anext__()
    await adapter.settle(first, Requeue(delay_s=60))
    await stream.aclose()  # type: ignore[attr-defined]
    # a Celery worker's record for another queue is not ours to count
    await rc.hset("unacked", "x", json.dumps([{"properties": {}}, "", "other"]))
    assert await adapter.depth("dp") == QueueDepth(ready=2, reserved=1, delayed=1)
    assert await adapter.depth("other") == QueueDepth(ready=1, reserved=1, delayed=0)


async def test_global_keyprefix_prefixes_every_key(redis_url: str, rc: aioredis.Redis) -> None:
    async def keys() -> set[bytes]:
        """Every key; the restore sweep's lock (prefixed too) comes and goes with each sweep."""
        found = set(await rc.keys("*"))
        assert all(key.startswith(b"pfx:") for key in found), found
        return found - {b"pfx:unacked_mutex"}

    broker = RedisAdapter(redis_url, global_keyprefix="pfx:")
    await broker.connect()
    try:
        await broker.publish("q", message(1, priority=6))
        stream = broker.deliveries(["q"], 5)
        delivery = await stream.__anext__()
        assert delivery.queue == "q"
        await stream.aclose()  # type: ignore[attr-defined]
        assert await rc.hlen("pfx:unacked") == 1 and await rc.zcard("pfx:unacked_index") == 1
        await broker.settle(delivery, DeadLetter("x"))
        assert await keys() == {b"pfx:q.dlq", b"pfx:serve_queue.stagings"}
        (member,) = await rc.zrange("pfx:serve_queue.stagings", 0, -1)
        assert member.startswith(b"5:pfx:qpfx:serve_queue.staging.q.")
    finally:
        await broker.close()
    assert await keys() == {b"pfx:q.dlq"}


async def test_open_adapter_builds_it_from_a_url(redis_url: str) -> None:
    broker = open_adapter(redis_url, visibility_timeout=5)
    assert isinstance(broker, RedisAdapter) and isinstance(broker, BrokerAdapter)
    assert broker.visibility_timeout == 5.0
    with pytest.raises(ConfigurationError):
        RedisAdapter("amqp://localhost//")
    with pytest.raises(ConfigurationError):
        RedisAdapter(redis_url, dead_letter_queue="{nope}.dlq")


async def test_connection_errors_are_translated_and_hide_the_password() -> None:
    secret = "s3cr3t-pw"
    broker = RedisAdapter(f"redis://:{secret}@127.0.0.1:{free_port()}/0", socket_timeout=1)
    assert secret not in repr(broker) and secret not in str(broker)
    with pytest.raises(BrokerUnavailable) as caught:
        await broker.connect()
    assert caught.value.__cause__ is not None
    assert type(caught.value.__cause__).__module__.startswith("redis")
    assert secret not in str(caught.value) and secret not in repr(caught.value)
    assert secret not in str(caught.value.__cause__)
    with pytest.raises(BrokerError, match="not connected"):
        await broker.publish("q", message(1))


async def test_password_auth_and_a_wrong_one(redis_url: str, rc: aioredis.Redis) -> None:
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    await rc.execute_command("ACL", "SETUSER", "sq-user", "on", ">right-pw", "~*", "+@all")  # type: ignore[no-untyped-call]
    try:
        good = RedisAdapter(f"redis://sq-user:right-pw@127.0.0.1:{port}/0")
        await good.connect()
        await good.publish("auth", message(1))
        assert "right-pw" not in repr(good)
        await good.close()
        secret = "wr0ng-pw-123"
        bad = RedisAdapter(f"redis://sq-user:{secret}@127.0.0.1:{port}/0")
        with pytest.raises(BrokerError) as caught:
            await bad.connect()
        assert secret not in str(caught.value) and secret not in repr(bad)
        assert secret not in str(caught.value.__cause__)
    finally:
        await rc.execute_command("ACL", "DELUSER", "sq-user")  # type: ignore[no-untyped-call]
    assert await rc.llen("auth") == 1


async def test_server_errors_are_broker_errors(adapter: RedisAdapter, rc: aioredis.Redis) -> None:
    await rc.set("str", "not a list")
    with pytest.raises(BrokerError) as caught:
        await adapter.publish("str", message(1))
    assert not isinstance(caught.value, BrokerUnavailable)
    assert caught.value.__cause__ is not None


@pytest.mark.timeout(30)
async def test_stalled_server_makes_deliveries_raise_unavailable_then_resume(
    redis_url: str, rc: aioredis.Redis
) -> None:
    broker = RedisAdapter(redis_url, socket_timeout=0.3)
    await broker.connect()
    await broker.publish("stall", message(1))
    stream = broker.deliveries(["stall"], 5)
    first = await stream.__anext__()
    await rc.client_pause(1500, all=True)  # the server answers nobody for 1.5 s
    with pytest.raises(BrokerUnavailable):
        await stream.__anext__()
    await rc.ping()  # answered once the pause is over
    await broker.publish("stall", message(2))
    again = broker.deliveries(["stall"], 5)
    second = await again.__anext__()
    assert (first.headers["n"], second.headers["n"]) == (1, 2)
    assert await rc.hlen("unacked") == 2, "nothing fetched was lost in between"
    await again.aclose()  # type: ignore[attr-defined]
    await broker.close()


async def test_delivery_token_and_repr_stay_opaque(adapter: RedisAdapter) -> None:
    await adapter.publish("tok", message(1))
    stream = adapter.deliveries(["tok"], 1)
    delivery: Delivery = await stream.__anext__()
    assert "token" not in repr(delivery)
    await adapter.settle(delivery, Ack())
    await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
async def test_a_callers_timeout_takes_effect_against_a_frozen_broker(
    redis_url: str, redis_server: Any
) -> None:
    """``asyncio.wait_for(queue.send_task(...), 1)`` returns after about a second, not after
    the 10 s socket timeout: the shared publish batch goes on without the caller, who learns
    only that nothing was confirmed."""
    from serve_queue import TaskQueue

    queue = TaskQueue(redis_url, results=None)
    await queue.send_task("tasks.warm", args=[])  # connected before the freeze
    try:
        with redis_server.frozen():
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(queue.send_task("tasks.add", args=[1, 2]), 1.0)
            waited = time.monotonic() - started
            assert waited < 3.0, f"the caller's timeout took {waited:.1f}s to take effect"
    finally:
        await asyncio.wait_for(queue.close(), 30)
