"""The embedded SQLite broker and result store: the shared contract plus what is SQLite's own
(URLs and default path, priority, several processes on one file, never blocking the loop,
locking errors, results with rich types, never overwriting SUCCESS, expiry)."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from serve_queue.adapters import _sqlite_schema, open_adapter
from serve_queue.adapters import sqlite as sqlite_mod
from serve_queue.adapters.sqlite import (
    SQLiteAdapter,
    SQLiteResultBackend,
    database_path,
    default_url,
)
from serve_queue.config import BrokerURL
from serve_queue.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    ResultBackendError,
    TaskTimeout,
)
from serve_queue.types import (
    Ack,
    BrokerAdapter,
    DeadLetter,
    Delivery,
    OutgoingMessage,
    Requeue,
    ResultBackend,
)
from tests.adapters.contract import AdapterContract

T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)


def msg(body: str, **properties: Any) -> OutgoingMessage:
    return OutgoingMessage(body=body.encode(), headers={"id": body}, properties=properties)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "serve queue.db"  # a space: URLs must survive percent-encoding


@pytest.fixture
def db_url(db_path: Path) -> str:
    return "sqlite://" + str(db_path).replace(" ", "%20")


@pytest.fixture
async def adapter(db_url: str) -> AsyncIterator[SQLiteAdapter]:
    broker = SQLiteAdapter(db_url)
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture
async def results(db_url: str) -> AsyncIterator[SQLiteResultBackend]:
    backend = SQLiteResultBackend(db_url)
    await backend.connect()
    yield backend
    await backend.close()


async def take(adapter: SQLiteAdapter, queue: str, n: int, prefetch: int = 100) -> list[Delivery]:
    """The next ``n`` deliveries from ``queue``, left unsettled; the iteration is closed."""
    got: list[Delivery] = []
    stream = adapter.deliveries([queue], prefetch)
    try:
        async for delivery in stream:
            got.append(delivery)
            if len(got) == n:
                break
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    return got


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 10.0) -> T:
    """Poll ``check`` until it returns something truthy (or fail after ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value or loop.time() > deadline:
            assert value, "condition not reached in time"
            return value
        await asyncio.sleep(0.02)


def bodies(deliveries: list[Delivery]) -> list[str]:
    return [d.body.decode() for d in deliveries]


class TestSQLiteContract(AdapterContract):
    """The shared contract on a fresh database file per test; the crash test kills a real
    consumer process that shares the file."""

    crash_mode = "process"
    lease_s = 1.0
    redelivery_timeout = 10.0
    quiet_s = 0.5
    depth_timeout = 5.0

    @pytest.fixture(autouse=True)
    def _database(self, db_url: str, db_path: Path) -> None:
        self.url, self.path = db_url, db_path

    def make_adapter(self, **overrides: Any) -> BrokerAdapter:
        return SQLiteAdapter(self.url, **overrides)

    def adapter_spec(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
        return "serve_queue.adapters.sqlite:SQLiteAdapter", {"url": self.url, **overrides}

    async def dead_letters(self, adapter: BrokerAdapter, queue: str) -> list[tuple[bytes, str]]:
        assert isinstance(adapter, SQLiteAdapter)
        return [(letter.body, letter.reason) for letter in await adapter.dead_letters(queue)]

    async def push_raw(self, queue: str, raw: bytes) -> None:
        """A row whose envelope columns (headers, properties) are not kombu JSON."""
        text = raw.decode(errors="replace")
        with sqlite3.connect(self.path) as conn:
            conn.execute(
                "INSERT INTO messages (queue, body, content_type, content_encoding, headers, "
                "properties, enqueued_at, ready_at) VALUES (?, ?, '', '', ?, ?, 0, 0)",
                (queue, raw, text, text),
            )


# -- URLs and the default location ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///tmp/x.db", "/tmp/x.db"),
        ("sqlite:////tmp/x.db", "/tmp/x.db"),
        ("sqlite:///tmp/a%20b.db", "/tmp/a b.db"),
        ("sqlite:///x.db", "/x.db"),
    ],
)
def test_url_forms_name_an_absolute_path(url: str, expected: str) -> None:
    assert database_path(url) == expected
    assert database_path(BrokerURL.parse(url)) == expected


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://host/x.db",
        "sqlite:///:memory:",
        "sqlite://",
        "sqlite:///",
        "sqlite:///x.db?mode=ro",
    ],
)
def test_url_forms_that_are_rejected(url: str) -> None:
    with pytest.raises(ConfigurationError):
        database_path(url)


def test_open_adapter_picks_sqlite_by_scheme(db_url: str, db_path: Path) -> None:
    broker = open_adapter(db_url, visibility_timeout=5.0)
    assert isinstance(broker, SQLiteAdapter)
    assert broker.path == str(db_path)
    assert broker.visibility_timeout == 5.0


def test_default_url_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a dir" / "q.db"
    monkeypatch.setenv("SERVE_QUEUE_DB", str(target))
    assert database_path(default_url()) == str(target)
    assert target.parent.is_dir()


def test_default_url_is_a_stable_per_user_cache_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SERVE_QUEUE_DB", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "serve_queue" / "serve_queue.db"
    assert database_path(default_url()) == str(expected)
    assert default_url() == default_url()
    assert expected.parent.is_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert database_path(default_url()) == str(tmp_path / "xdg" / "serve_queue" / "serve_queue.db")


def test_default_url_rejects_a_relative_environment_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVE_QUEUE_DB", "relative/q.db")
    with pytest.raises(ConfigurationError, match="absolute"):
        default_url()


# -- errors -------------------------------------------------------------------------------------


async def test_a_database_that_cannot_be_opened_is_unavailable_and_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "x.db"
    broker = SQLiteAdapter(f"sqlite://{missing}")
    with pytest.raises(BrokerUnavailable, match=str(missing)) as info:
        await broker.connect()
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an sqlite database, not at all" * 100)
    with pytest.raises(BrokerUnavailable, match=str(junk)):
        await SQLiteAdapter(f"sqlite://{junk}").connect()


async def test_a_newer_schema_is_refused(db_path: Path, db_url: str) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigurationError, match="newer"):
        await SQLiteAdapter(db_url).connect()


async def test_locked_database_is_unavailable_then_recovers(db_path: Path, db_url: str) -> None:
    broker = SQLiteAdapter(db_url, busy_timeout=0.1)
    await broker.connect()
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BrokerUnavailable, match="locked") as info:
            await broker.publish("q", msg("a"))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await broker.publish("q", msg("b"))  # the connection is usable again
    assert bodies(await take(broker, "q", 1)) == ["b"]
    await broker.close()


async def test_a_failed_settle_frees_its_slot_and_may_be_retried(
    db_path: Path, db_url: str
) -> None:
    broker = SQLiteAdapter(db_url, busy_timeout=0.1)
    await broker.connect()
    await broker.publish("q", msg("a"))
    await broker.publish("q", msg("b"))
    stream = broker.deliveries(["q"], 1)
    first = await anext(stream)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(BrokerUnavailable):
        await broker.settle(first, Ack())
    holder.execute("ROLLBACK")
    holder.close()
    await broker.settle(first, Ack())  # the retry lands
    second = await asyncio.wait_for(anext(stream), 10)  # and the prefetch slot was freed
    assert second.body == b"b"
    await broker.settle(second, Ack())
    assert (await broker.depth("q")).total == 0
    await stream.aclose()  # type: ignore[attr-defined]
    await broker.close()


async def test_use_before_connect_and_after_close_is_an_error(db_url: str) -> None:
    broker = SQLiteAdapter(db_url)
    with pytest.raises(BrokerError, match="not connected"):
        await broker.publish("q", msg("a"))
    await broker.connect()
    await broker.close()
    with pytest.raises(BrokerError, match="closed"):
        await broker.publish("q", msg("a"))


# -- ordering, leases, settling -----------------------------------------------------------------


async def test_higher_priority_first_then_fifo(adapter: SQLiteAdapter) -> None:
    for name, priority in [("a0", 0), ("b5", 5), ("c9", 9), ("d5", 5), ("e0", 0), ("f9", 9)]:
        await adapter.publish("q", msg(name, priority=priority))
    await adapter.publish("q", msg("g-none"))
    order = []
    stream = adapter.deliveries(["q"], 1)  # one at a time: the order is the claim order
    async for delivery in stream:
        order.append(delivery.body.decode())
        await adapter.settle(delivery, Ack())
        if len(order) == 7:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert order == ["c9", "f9", "b5", "d5", "a0", "e0", "g-none"]


async def test_round_trip_keeps_body_headers_properties(adapter: SQLiteAdapter) -> None:
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    sent = OutgoingMessage(
        body=b"\x00\xffbinary",
        content_type="application/x-msgpack",
        content_encoding="binary",
        headers={"task": "t", "eta": when, "argsrepr": "(1,)"},
        properties={"correlation_id": "c-1", "priority": 3},
    )
    await adapter.publish("q", sent)
    (got,) = await take(adapter, "q", 1)
    assert (got.body, got.content_type, got.content_encoding) == (
        sent.body,
        sent.content_type,
        sent.content_encoding,
    )
    assert dict(got.headers) == dict(sent.headers)
    assert dict(got.properties) == dict(sent.properties)
    assert got.queue == "q"
    assert not got.redelivered
    assert got.envelope_error is None


async def test_requeue_now_goes_back_to_the_front_redelivered(adapter: SQLiteAdapter) -> None:
    for name in "abc":
        await adapter.publish("q", msg(name))
    (first,) = await take(adapter, "q", 1, prefetch=1)
    await adapter.settle(first, Requeue(0))
    again = await take(adapter, "q", 3)
    assert bodies(again) == ["a", "b", "c"]
    assert [d.redelivered for d in again] == [True, False, False]


async def test_requeue_with_delay_parks_the_message(adapter: SQLiteAdapter) -> None:
    await adapter.publish("q", msg("later"))
    (first,) = await take(adapter, "q", 1)
    await adapter.settle(first, Requeue(0.3))
    depth = await adapter.depth("q")
    assert (depth.ready, depth.reserved, depth.delayed) == (0, 0, 1)
    (again,) = await take(adapter, "q", 1)  # comes back once the delay has passed
    assert again.body == b"later"
    assert again.redelivered
    assert (await adapter.depth("q")).reserved == 1


async def test_depth_counts_ready_reserved_delayed_and_age(adapter: SQLiteAdapter) -> None:
    assert (await adapter.depth("q")).oldest_age_s is None
    for name in "abcd":
        await adapter.publish("q", msg(name))
    a, b = await take(adapter, "q", 2)
    await adapter.settle(b, Requeue(60))
    depth = await adapter.depth("q")
    assert (depth.ready, depth.reserved, depth.delayed, depth.total) == (2, 1, 1, 4)
    assert depth.oldest_age_s is not None and depth.oldest_age_s >= 0
    assert (await adapter.depth("other")).total == 0
    await adapter.settle(a, Ack())
    assert (await adapter.depth("q")).total == 3


async def test_expired_lease_is_redelivered_elsewhere_and_late_ack_is_ignored(
    db_url: str, adapter: SQLiteAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    short = SQLiteAdapter(db_url, visibility_timeout=0.2)
    await short.connect()
    await short.publish("q", msg("slow"))
    (stale,) = await take(short, "q", 1)
    (fresh,) = await take(adapter, "q", 1)  # waits for the lease to run out
    assert fresh.body == b"slow" and fresh.redelivered
    await short.settle(stale, Ack())  # its lease was lost: must not delete the new holder's
    assert "lease had expired" in caplog.text
    assert (await adapter.depth("q")).reserved == 1
    await adapter.settle(fresh, Ack())
    assert (await adapter.depth("q")).total == 0
    await short.close()


async def test_extend_keeps_the_lease(db_url: str) -> None:
    broker = SQLiteAdapter(db_url, visibility_timeout=0.2)
    await broker.connect()
    await broker.publish("q", msg("long"))
    (held,) = await take(broker, "q", 1)
    await broker.extend(held, 30)
    await asyncio.sleep(0.4)  # well past the original 0.2 s lease
    depth = await broker.depth("q")
    assert (depth.ready, depth.reserved) == (0, 1)
    await broker.settle(held, Ack())
    assert (await broker.depth("q")).total == 0
    await broker.close()


async def test_dead_letter_keeps_bytes_and_reason(db_url: str) -> None:
    broker = SQLiteAdapter(db_url, dead_letter_queue="dead-{queue}")
    await broker.connect()
    await broker.publish("q", msg("poison", priority=4))
    (got,) = await take(broker, "q", 1)
    await broker.settle(got, DeadLetter("cannot decode"))
    assert (await broker.depth("q")).total == 0
    (dead,) = await broker.dead_letters("q")
    assert (dead.queue, dead.source_queue, dead.reason) == ("dead-q", "q", "cannot decode")
    assert (dead.body, dict(dead.headers), dead.priority) == (b"poison", {"id": "poison"}, 4)
    assert dead.delivery_count == 1
    await broker.close()


async def test_unreadable_row_is_yielded_with_envelope_error(
    adapter: SQLiteAdapter, db_path: Path
) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "INSERT INTO messages (queue, body, content_type, content_encoding, headers, "
            "properties, enqueued_at, ready_at) VALUES ('q', x'01', 'a', 'b', '{oops', '[]', 0, 0)"
        )
    (bad,) = await take(adapter, "q", 1)
    assert bad.envelope_error is not None and bad.body == b"\x01"
    await adapter.settle(bad, DeadLetter(bad.envelope_error))
    (dead,) = await adapter.dead_letters("q")
    assert dead.body == b"\x01"


async def test_close_hands_back_unsettled_at_once(db_url: str, adapter: SQLiteAdapter) -> None:
    other = SQLiteAdapter(db_url)  # visibility 60 s: only an explicit hand-back frees them
    await other.connect()
    for name in "abcde":
        await other.publish("q", msg(name))
    held = await take(other, "q", 5)
    await other.settle(held[0], Ack())
    await other.close()
    again = await take(adapter, "q", 4)
    assert bodies(again) == ["b", "c", "d", "e"]
    assert all(d.redelivered for d in again)
    await other.settle(held[1], Ack())  # after close: a no-op, the new holder keeps it
    assert (await adapter.depth("q")).reserved == 4


async def test_close_racing_a_claim_still_hands_everything_back(
    db_url: str, adapter: SQLiteAdapter
) -> None:
    other = SQLiteAdapter(db_url)
    await other.connect()
    for name in "abcde":
        await adapter.publish("q", msg(name))
    consumer = asyncio.ensure_future(take(other, "q", 5))
    await asyncio.sleep(0)  # the consumer has just submitted its claim
    await other.close()
    assert await consumer == []  # closed before anything was yielded
    depth = await adapter.depth("q")
    assert (depth.ready, depth.reserved) == (5, 0)


async def test_leaving_the_iteration_hands_back_what_was_not_yielded(
    adapter: SQLiteAdapter,
) -> None:
    for i in range(10):
        await adapter.publish("q", msg(str(i)))
    (first,) = await take(adapter, "q", 1, prefetch=10)  # a batch of 10 was claimed
    depth = await adapter.depth("q")
    assert (depth.ready, depth.reserved) == (9, 1)
    assert first.body == b"0"


async def test_cancelled_claim_hands_its_messages_back(
    adapter: SQLiteAdapter, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        await adapter.publish("q", msg(str(i)))
    claims: list[int] = []
    original = _sqlite_schema.Store.claim

    def watched(self: _sqlite_schema.Store, *args: Any) -> list[_sqlite_schema.MessageRow]:
        claims.append(1)
        return original(self, *args)

    monkeypatch.setattr(_sqlite_schema.Store, "claim", watched)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the claim will wait for this lock on its thread
    consumer = asyncio.ensure_future(take(adapter, "q", 5))

    async def claiming() -> bool:
        return bool(claims)

    await eventually(claiming)
    consumer.cancel()
    holder.execute("COMMIT")  # now the claim lands, after its caller is gone
    holder.close()
    with pytest.raises(asyncio.CancelledError):
        await consumer

    async def all_ready() -> bool:
        depth = await adapter.depth("q")
        return (depth.ready, depth.reserved) == (5, 0)

    await eventually(all_ready)


async def test_prefetch_bound_holds_until_a_settle(adapter: SQLiteAdapter) -> None:
    for i in range(5):
        await adapter.publish("q", msg(str(i)))
    stream = adapter.deliveries(["q"], 2)
    first, second = await anext(stream), await anext(stream)
    third = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.3)  # many poll intervals: a third must not arrive unsettled
    assert not third.done()
    assert (await adapter.depth("q")).reserved == 2
    await adapter.settle(first, Ack())
    assert (await asyncio.wait_for(third, 10)).body == b"2"
    await adapter.settle(second, Ack())
    await stream.aclose()  # type: ignore[attr-defined]


async def test_publish_wakes_a_waiting_consumer_of_the_same_instance(
    adapter: SQLiteAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_timer(event: asyncio.Event, seconds: float) -> None:
        await event.wait()  # polling off: only the in-process wake-up can deliver

    monkeypatch.setattr(sqlite_mod, "nap", no_timer)
    waiting = asyncio.ensure_future(take(adapter, "q", 1))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await adapter.publish("q", msg("hello"))
    assert bodies(await asyncio.wait_for(waiting, 10)) == ["hello"]


async def test_concurrent_settles_and_publishes_share_transactions(
    adapter: SQLiteAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    original = _sqlite_schema.Store.run_batch

    def counting(self: _sqlite_schema.Store, ops: list[Any]) -> list[Any]:
        batches.append(len(ops))
        return original(self, ops)

    monkeypatch.setattr(_sqlite_schema.Store, "run_batch", counting)
    await asyncio.gather(*(adapter.publish("q", msg(str(i))) for i in range(300)))
    assert sum(batches) == 300 and len(batches) <= 3
    got = await take(adapter, "q", 300, prefetch=300)
    batches.clear()
    await asyncio.gather(*(adapter.settle(d, Ack()) for d in got))
    assert sum(batches) == 300 and len(batches) <= 3
    assert (await adapter.depth("q")).total == 0


async def test_the_event_loop_keeps_running_while_the_database_is_locked(
    db_path: Path, adapter: SQLiteAdapter
) -> None:
    await asyncio.gather(*(adapter.publish("q", msg(str(i))) for i in range(2000)))
    loop = asyncio.get_running_loop()
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock for a second
    loop.call_later(1.0, holder.execute, "COMMIT")
    stop = asyncio.Event()

    async def heartbeat() -> float:
        worst, last = 0.0, loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            worst, last = max(worst, loop.time() - last), loop.time()
        return worst

    beat = asyncio.ensure_future(heartbeat())
    started = loop.time()
    got = await take(adapter, "q", 2000, prefetch=2000)  # one big claim, behind the lock
    await adapter.publish("q", msg("after"))
    waited = loop.time() - started
    stop.set()
    worst_gap = await beat
    holder.close()
    assert len(got) == 2000
    assert waited >= 0.9, "the claim should have waited for the other writer's lock"
    assert worst_gap < 0.5, f"the event loop stalled for {worst_gap:.3f}s"


# -- several processes on one file --------------------------------------------------------------

_CONSUMER = """
import asyncio, json, sys
from serve_queue.adapters.sqlite import SQLiteAdapter
from serve_queue.types import Ack

async def main(url: str) -> None:
    adapter = SQLiteAdapter(url)
    await adapter.connect()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    seen, acks = [], set()

    async def consume() -> None:
        async for delivery in adapter.deliveries(["shared"], 50):
            seen.append(delivery.body.decode())
            task = asyncio.ensure_future(adapter.settle(delivery, Ack()))
            acks.add(task)
            task.add_done_callback(acks.discard)

    consumer = asyncio.ensure_future(consume())
    while (await adapter.depth("shared")).total:
        await asyncio.sleep(0.02)
    consumer.cancel()
    await adapter.close()
    print(json.dumps(seen), flush=True)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_processes_share_one_file_and_each_message_is_taken_once(
    db_url: str, adapter: SQLiteAdapter
) -> None:
    sent = [f"m{i}" for i in range(2000)]
    await asyncio.gather(*(adapter.publish("shared", msg(name)) for name in sent))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CONSUMER,
            db_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:  # both started and connected before either consumes
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).strip() == b"ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 90)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert [p.returncode for p in procs] == [0, 0]
    seen = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    combined = seen[0] + seen[1]
    assert len(combined) == len(set(combined)), "a message was delivered twice"
    assert sorted(combined) == sorted(sent), "a message was lost"
    assert seen[0] and seen[1], "both processes should have taken part"


# -- results ------------------------------------------------------------------------------------


async def test_results_store_get_and_wait(results: SQLiteResultBackend) -> None:
    assert await results.get("nope") is None
    await results.store("t1", {"status": "STARTED", "result": None, "task_id": "t1"})
    assert (await results.get("t1")) == {"status": "STARTED", "result": None, "task_id": "t1"}
    with pytest.raises(TaskTimeout):
        await results.wait("t1", 0.1)
    waiter = asyncio.ensure_future(results.wait("t1", 10))
    await results.store("t1", {"status": "SUCCESS", "result": 42, "task_id": "t1"})
    assert (await waiter)["result"] == 42


async def test_results_never_overwrite_success(results: SQLiteResultBackend) -> None:
    await results.store("t", {"status": "SUCCESS", "result": "first"})
    await results.store("t", {"status": "FAILURE", "result": "late"})
    await results.store("t", {"status": "SUCCESS", "result": "again"})
    assert await results.get("t") == {"status": "SUCCESS", "result": "first"}
    await results.store("f", {"status": "FAILURE", "result": "x"})
    await results.store("f", {"status": "SUCCESS", "result": "retried"})
    assert (await results.get("f")) == {"status": "SUCCESS", "result": "retried"}


async def test_results_keep_rich_types(results: SQLiteResultBackend) -> None:
    value = {
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 1, 2),
        "amount": decimal.Decimal("10.10"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "raw": b"\x00\xff",
        "nested": [{"x": 1}],
    }
    await results.store("rich", {"status": "SUCCESS", "result": value})
    assert (await results.get("rich")) == {"status": "SUCCESS", "result": value}


async def test_results_expire_and_are_purged(db_url: str, db_path: Path) -> None:
    backend = SQLiteResultBackend(db_url, result_ttl=0.1)
    await backend.connect()
    await backend.store("old", {"status": "SUCCESS", "result": 1})
    assert await backend.get("old") is not None
    await asyncio.sleep(0.2)  # past the 0.1 s lifetime
    assert await backend.get("old") is None
    await backend.store("old", {"status": "FAILURE", "result": 2})  # expired SUCCESS is gone
    assert (await backend.get("old")) == {"status": "FAILURE", "result": 2}
    await backend.close()
    await asyncio.sleep(0.2)
    fresh = SQLiteResultBackend(db_url)
    await fresh.connect()  # connecting purges what has expired
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0
    await fresh.close()


async def test_results_and_broker_share_one_file_across_instances(
    db_url: str, adapter: SQLiteAdapter, results: SQLiteResultBackend
) -> None:
    writer = SQLiteResultBackend(db_url)
    await writer.connect()
    waiter = asyncio.ensure_future(results.wait("x", 10))
    await adapter.publish("q", msg("a"))
    await writer.store("x", {"status": "REVOKED", "result": None})
    assert (await waiter)["status"] == "REVOKED"
    assert (await adapter.depth("q")).ready == 1
    await writer.close()


def test_both_classes_satisfy_the_protocols(db_url: str) -> None:
    broker: BrokerAdapter = SQLiteAdapter(db_url)
    backend: ResultBackend = SQLiteResultBackend(db_url)
    assert isinstance(broker, BrokerAdapter)
    assert isinstance(backend, ResultBackend)


async def test_results_errors_are_result_backend_errors(tmp_path: Path) -> None:
    backend = SQLiteResultBackend(f"sqlite://{tmp_path}/missing/r.db")
    with pytest.raises(ResultBackendError, match="missing"):
        await backend.connect()


async def test_many_waiters_share_one_query_per_tick(
    db_url: str, results: SQLiteResultBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries: list[int] = []
    original = _sqlite_schema.Store.ready_results

    def counting(self: _sqlite_schema.Store, task_ids: list[str]) -> list[tuple[str, str]]:
        queries.append(len(task_ids))
        return original(self, task_ids)

    monkeypatch.setattr(_sqlite_schema.Store, "ready_results", counting)
    waiters = [asyncio.ensure_future(results.wait(f"w{i}", 30)) for i in range(500)]
    await asyncio.sleep(0.3)
    assert queries and max(queries) == 500, "one query asks about every waiter"
    assert len(queries) < 100, "waiters must not poll one by one"
    writer = SQLiteResultBackend(db_url)  # another connection, as another process would
    await writer.connect()
    await asyncio.gather(
        *(writer.store(f"w{i}", {"status": "SUCCESS", "result": i}) for i in range(500))
    )
    metas = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert [meta["result"] for meta in metas] == list(range(500))
    await writer.close()


async def test_wait_reports_unreadable_meta_and_survives_a_cancelled_waiter(
    db_path: Path, results: SQLiteResultBackend
) -> None:
    cancelled = asyncio.ensure_future(results.wait("gone", None))
    broken = asyncio.ensure_future(results.wait("broken", 10))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO results VALUES ('broken', 'SUCCESS', '{not json', NULL)")
    with pytest.raises(ResultBackendError, match="broken"):
        await broken
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(TaskTimeout):
        await results.wait("gone", 0)
