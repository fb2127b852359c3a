"""The whole engine, producer to result, on the in-memory broker and result store.

Every outcome of design.md §6: success, failure, retry, reject, poison input, expiry, parked
ETAs, early/late ack, follow-ups, drain, broker outage. Real brokers are proved by the adapter
contract suite and the interop tests; this proves the engine's decisions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_queue import Reject, Retry, TaskFailed, TaskQueue, TaskTimeout, task
from serve_queue.adapters.memory import MemoryBroker
from serve_queue.consumer import Consumer
from serve_queue.protocol import SendOptions, encode_task
from serve_queue.testing import celery_message

pytestmark = pytest.mark.timeout(30)


class Handlers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.release = asyncio.Event()
        self.attempts = 0

    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:
        self.calls.append(("add", (x, y)))
        return x + y

    @task("tasks.thread")
    def in_thread(self, name: str) -> str:
        return f"{name} on {threading.current_thread().name}"

    @task("tasks.fail")
    async def fail(self, message: str) -> None:
        raise ValueError(message)

    @task("tasks.flaky", max_retries=3)
    async def flaky(self, succeed_on: int) -> int:
        self.attempts += 1
        if self.attempts < succeed_on:
            raise Retry(0)
        return self.attempts

    @task("tasks.refuse")
    async def refuse(self) -> None:
        raise Reject("not for us")

    @task("tasks.wait")
    async def wait(self) -> str:
        await self.release.wait()
        return "released"

    @task("tasks.slow", time_limit=0.1)
    async def slow(self) -> None:
        await asyncio.sleep(5)

    @task("tasks.failing_no_ack", acks_on_failure_or_timeout=False)
    async def failing_no_ack(self) -> None:
        raise RuntimeError("keep me")


@pytest.fixture
def queue() -> TaskQueue:
    return TaskQueue("memory://engine", results="memory://")


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
async def worker(queue: TaskQueue, handlers: Handlers) -> AsyncIterator[Consumer]:
    async with queue.worker(handlers, concurrency=20, threads=2, drain_timeout=1) as consumer:
        yield consumer
    await queue.close()


def broker_of(queue: TaskQueue) -> MemoryBroker:
    broker = queue.broker_options["broker"]
    assert isinstance(broker, MemoryBroker)
    return broker


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_round_trip_async_and_sync_handlers(queue: TaskQueue, worker: Consumer) -> None:
    result = await queue.send_task("tasks.add", args=[2, 3])
    assert await result.get(timeout=5) == 5
    assert await result.state() == "SUCCESS"
    threaded = await queue.send_task("tasks.thread", args=["x"])
    assert "serve-queue" in await threaded.get(timeout=5)
    assert broker_of(queue).depth("celery").total == 0


async def test_failure_carries_the_remote_exception(queue: TaskQueue, worker: Consumer) -> None:
    result = await queue.send_task("tasks.fail", args=["boom"])
    with pytest.raises(TaskFailed) as info:
        await result.get(timeout=5)
    assert info.value.exc_type == "ValueError"
    assert info.value.exc_message == ["boom"]
    assert "raise ValueError(message)" in (info.value.traceback or "")
    assert await result.state() == "FAILURE"
    assert worker.stats.failed == 1


async def test_retry_republishes_same_id_until_success(
    queue: TaskQueue, worker: Consumer, handlers: Handlers
) -> None:
    result = await queue.send_task("tasks.flaky", args=[3])
    assert await result.get(timeout=5) == 3
    assert worker.stats.retried == 2


async def test_retries_exhausted_is_a_failure(queue: TaskQueue, worker: Consumer) -> None:
    result = await queue.send_task("tasks.flaky", args=[100])
    with pytest.raises(TaskFailed) as info:
        await result.get(timeout=5)
    assert info.value.exc_type == "MaxRetriesExceededError"
    assert worker.stats.retried == 3


async def test_reject_dead_letters_and_stores_failure(queue: TaskQueue, worker: Consumer) -> None:
    result = await queue.send_task("tasks.refuse")
    with pytest.raises(TaskFailed) as info:
        await result.get(timeout=5)
    assert info.value.exc_type == "Reject"
    [dead] = broker_of(queue).dead_letters("celery.dlq")
    assert "not for us" in dead.reason


async def test_poison_input_is_dead_lettered_and_the_worker_keeps_serving(
    queue: TaskQueue, worker: Consumer
) -> None:
    adapter = broker_of(queue).adapter()
    await adapter.connect()
    unknown = await queue.send_task("tasks.nope", args=[1])
    bad_args = await queue.send_task("tasks.add", args=["not a number", 1])
    await adapter.publish("celery", celery_message("tasks.add", [1], properties={}, id="x1"))
    garbage = celery_message("tasks.add", [1, 2])
    await adapter.publish(
        "celery",
        type(garbage)(
            body=b"\xff{not json", headers=garbage.headers, properties=garbage.properties
        ),
    )
    good = await queue.send_task("tasks.add", args=[1, 1])
    assert await good.get(timeout=5) == 2

    with pytest.raises(TaskFailed) as info:
        await unknown.get(timeout=5)
    assert info.value.exc_type == "NotRegistered"
    with pytest.raises(TaskFailed):
        await bad_args.get(timeout=5)
    await until(lambda: sum(worker.stats.dead_lettered.values()) == 4)
    reasons = sorted(d.reason.split(":")[0] for d in broker_of(queue).dead_letters("celery.dlq"))
    assert reasons == ["invalid-arguments", "invalid-arguments", "undecodable", "unknown-task"]
    bodies = [d.body for d in broker_of(queue).dead_letters("celery.dlq")]
    assert b"\xff{not json" in bodies  # the original bytes are kept
    await adapter.close()


async def test_a_decompression_bomb_is_dead_lettered_and_the_worker_keeps_serving(
    queue: TaskQueue, handlers: Handlers
) -> None:
    sent = encode_task("tasks.add", [1, 2], {}, SendOptions(compression="zlib"), origin="t@h")
    bomb = zlib.compress(b" " * 5_000_000)
    async with queue.worker(handlers, max_decompressed_bytes=100_000, drain_timeout=1) as worker:
        adapter = broker_of(queue).adapter()
        await adapter.connect()
        await adapter.publish("celery", dataclasses.replace(sent, body=bomb))
        good = await queue.send_task("tasks.add", args=[1, 1], compression="zlib")
        assert await good.get(timeout=5) == 2
        await until(lambda: worker.stats.dead_lettered["undecodable"] == 1)
        await adapter.close()
    [dead] = broker_of(queue).dead_letters("celery.dlq")
    assert dead.body == bomb  # kept as it came, for a person to look at
    assert "expands to more than 100,000 bytes" in dead.reason
    await queue.close()


async def test_expired_messages_are_revoked_not_run(
    queue: TaskQueue, worker: Consumer, handlers: Handlers
) -> None:
    result = await queue.send_task("tasks.add", args=[1, 2], expires=-1.0)
    with pytest.raises(TaskFailed) as info:
        await result.get(timeout=5)
    assert info.value.exc_type == "TaskRevokedError"
    assert handlers.calls == []


async def test_future_eta_is_parked_on_the_broker_not_held(
    queue: TaskQueue, worker: Consumer
) -> None:
    result = await queue.send_task("tasks.add", args=[1, 2], countdown=30)
    await until(lambda: broker_of(queue).depth("celery").delayed == 1)
    depth = broker_of(queue).depth("celery")
    assert (depth.ready, depth.reserved) == (0, 0)
    assert await result.state() == "PENDING"


async def test_short_eta_runs_on_time(queue: TaskQueue, worker: Consumer) -> None:
    result = await queue.send_task("tasks.add", args=[1, 2], countdown=0.3)
    assert await result.get(timeout=5) == 3


async def test_hard_time_limit_fails_the_task(queue: TaskQueue, worker: Consumer) -> None:
    result = await queue.send_task("tasks.slow")
    with pytest.raises(TaskFailed) as info:
        await result.get(timeout=5)
    assert info.value.exc_type == "TimeLimitExceeded"


async def test_failure_without_ack_is_dead_lettered(queue: TaskQueue, worker: Consumer) -> None:
    result = await queue.send_task("tasks.failing_no_ack")
    with pytest.raises(TaskFailed):
        await result.get(timeout=5)
    await until(lambda: len(broker_of(queue).dead_letters("celery.dlq")) == 1)


async def test_link_and_chain_follow_ups_run(queue: TaskQueue, worker: Consumer) -> None:
    callback = {"task": "tasks.add", "args": [10], "kwargs": {}, "options": {"task_id": "cb-1"}}
    result = await queue.send_task("tasks.add", args=[1, 2], link=callback)
    assert await result.get(timeout=5) == 3
    assert await queue.result("cb-1").get(timeout=5) == 13
    meta = await result.meta()
    assert meta is not None and meta["children"] == [[["cb-1", None], None]]


async def test_late_ack_keeps_running_message_reserved(
    queue: TaskQueue, worker: Consumer, handlers: Handlers
) -> None:
    result = await queue.send_task("tasks.wait")
    await until(lambda: worker.running == 1)
    assert broker_of(queue).depth("celery").reserved == 1
    handlers.release.set()
    assert await result.get(timeout=5) == "released"
    await until(lambda: broker_of(queue).depth("celery").total == 0)


async def test_early_ack_settles_before_running(queue: TaskQueue, handlers: Handlers) -> None:
    async with queue.worker(handlers, acks="early") as consumer:
        result = await queue.send_task("tasks.wait")
        await until(lambda: consumer.running == 1)
        assert broker_of(queue).depth("celery").reserved == 0
        handlers.release.set()
        assert await result.get(timeout=5) == "released"


async def test_drain_lets_running_tasks_finish(queue: TaskQueue, handlers: Handlers) -> None:
    consumer = queue.worker(handlers)
    await consumer.start()
    result = await queue.send_task("tasks.wait")
    await until(lambda: consumer.running == 1)
    stopping = asyncio.create_task(consumer.stop(drain_timeout=5))
    await asyncio.sleep(0.05)
    handlers.release.set()
    await stopping
    assert await result.get(timeout=1) == "released"


async def test_drain_deadline_hands_unfinished_work_back(
    queue: TaskQueue, handlers: Handlers
) -> None:
    consumer = queue.worker(handlers)
    await consumer.start()
    result = await queue.send_task("tasks.wait")
    await until(lambda: consumer.running == 1)
    await consumer.stop(drain_timeout=0.1)
    # handed back at once, not after a visibility timeout
    assert broker_of(queue).depth("celery").ready == 1
    handlers.release.set()
    async with queue.worker(handlers):
        assert await result.get(timeout=5) == "released"


async def test_broker_outage_is_survived_and_reported(queue: TaskQueue, handlers: Handlers) -> None:
    async with queue.worker(handlers, health_grace_s=0.2) as consumer:
        broker_of(queue).faults.go_down()
        await until(lambda: not consumer.health().ok, timeout=10)
        assert "broker unreachable" in consumer.health().reason
        broker_of(queue).faults.restore()
        result = await queue.send_task("tasks.add", args=[2, 2])
        assert await result.get(timeout=10) == 4
        assert consumer.health().ok


async def test_duplicate_delivery_never_overwrites_success(
    queue: TaskQueue, worker: Consumer, handlers: Handlers
) -> None:
    broker_of(queue).faults.duplicate_next()
    result = await queue.send_task("tasks.add", args=[1, 1])
    assert await result.get(timeout=5) == 2
    await until(lambda: len(handlers.calls) == 2)
    assert await result.state() == "SUCCESS"


async def test_get_times_out_clearly(queue: TaskQueue) -> None:
    result = await queue.send_task("tasks.add", args=[1, 1])
    with pytest.raises(TaskTimeout):
        await result.get(timeout=0.1)


async def test_a_follow_up_that_cannot_be_encoded_does_not_undo_the_success(
    queue: TaskQueue, worker: Consumer
) -> None:
    bad_link = {"task": "tasks.add", "args": [1], "kwargs": {}, "options": {"serializer": "nope"}}
    result = await queue.send_task("tasks.add", args=[1, 2], link=bad_link)
    assert await result.get(timeout=5) == 3
    assert broker_of(queue).depth("celery").total == 0


async def test_an_internal_error_dead_letters_instead_of_looping(
    queue: TaskQueue, worker: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(delivery: Any) -> None:
        raise RuntimeError("a bug in serve_queue")

    monkeypatch.setattr(worker.dispatcher, "handle", broken)
    await queue.send_task("tasks.add", args=[1, 2])
    await until(lambda: len(broker_of(queue).dead_letters("celery.dlq")) == 1)
    assert "a bug in serve_queue" in broker_of(queue).dead_letters("celery.dlq")[0].reason
    assert broker_of(queue).depth("celery").total == 0


async def test_leases_follow_the_brokers_visibility_timeout(handlers: Handlers) -> None:
    """A task running longer than the visibility timeout is renewed, never redelivered."""
    queue = TaskQueue(
        "memory://lease", results="memory://", broker_options={"visibility_timeout": 0.3}
    )
    async with queue.worker(handlers) as consumer:
        assert consumer.lease_s == 0.3
        result = await queue.send_task("tasks.wait")
        await until(lambda: consumer.running == 1)
        await asyncio.sleep(1.0)  # over three visibility timeouts
        assert broker_of(queue).depth("celery").ready == 0
        handlers.release.set()
        assert await result.get(timeout=5) == "released"
        assert consumer.stats.received == 1  # not redelivered while it ran
    await queue.close()


async def test_errbacks_are_reported_not_silently_dropped(
    queue: TaskQueue, worker: Consumer, caplog: pytest.LogCaptureFixture
) -> None:
    errback = {"task": "tasks.on_error", "args": [], "kwargs": {}, "options": {}}
    result = await queue.send_task("tasks.fail", args=["x"], link_error=errback)
    with pytest.raises(TaskFailed):
        await result.get(timeout=5)
    assert "link_error callbacks are not supported yet" in caplog.text
    assert "tasks.on_error" in caplog.text
