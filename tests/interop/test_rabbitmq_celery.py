"""Celery 5.7 on RabbitMQ, both ways: real Celery producers feed our adapter, a real Celery
worker runs what we publish, and Celery's ``rpc://`` result backend talks to ours."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, TypeVar

import pytest

from serve_queue import protocol
from serve_queue.adapters.rabbitmq import RabbitMQAdapter, RPCResultBackend
from serve_queue.protocol import SendOptions
from serve_queue.results.meta import failure_meta, success_meta
from serve_queue.types import Ack, Requeue
from tests.adapters.contract import Pump
from tests.interop.celeryapp import make_app
from tests.interop.conftest import MakeApp, StartWorker, close_app
from tests.servers import RedisServer

pytestmark = [pytest.mark.interop, pytest.mark.slow]
T = TypeVar("T")


@pytest.fixture
async def adapter(amqp_url: str) -> AsyncIterator[RabbitMQAdapter]:
    broker = RabbitMQAdapter(amqp_url)
    await broker.connect()
    yield broker
    await broker.close()


@pytest.fixture
async def rpc(amqp_url: str) -> AsyncIterator[RPCResultBackend]:
    backend = RPCResultBackend(amqp_url)
    await backend.connect()
    yield backend
    await backend.close()


@pytest.fixture
def celery_thread() -> Any:
    """One thread for every call into a Celery app: its ``rpc://`` backend reads replies on
    the queue of the thread that sent the task (``app.thread_oid``)."""
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


async def in_thread(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args, **kw))


# -- Celery producer -> our adapter -----------------------------------------------------------


@pytest.mark.timeout(90)
async def test_celery_producer_messages_arrive_intact(
    amqp_url: str, adapter: RabbitMQAdapter, celery_app: MakeApp, pumps: list[Pump]
) -> None:
    app = celery_app(amqp_url)
    sent = await asyncio.to_thread(
        lambda: [
            app.send_task("tasks.add", (2, 3)),
            app.tasks["tasks.mul"].delay(4, 5),
            app.tasks["tasks.echo"].apply_async(
                (1,), {"k": "v"}, priority=7, headers={"x-custom": "v", "tenant": "t1"},
                expires=120, countdown=5, time_limit=60, soft_time_limit=50,
            ),
        ]
    )  # fmt: skip
    pumps.append(pump := Pump(adapter, ["celery"], 10))
    deliveries = {d.headers["id"]: d for d in await pump.take(3, 30, "Celery's messages")}
    add, mul, echo = (deliveries[r.id] for r in sent)
    for delivery, result in zip((add, mul, echo), sent, strict=True):
        assert delivery.properties["correlation_id"] == result.id
        assert delivery.properties["reply_to"] == add.properties["reply_to"] != ""  # app oid
        assert delivery.properties["delivery_mode"] == 2
        assert delivery.properties["delivery_info"] == {
            "exchange": "", "routing_key": "celery", "redelivered": False
        }  # fmt: skip
        assert (delivery.content_type, delivery.content_encoding) == ("application/json", "utf-8")
    message = protocol.decode(add)
    assert (message.name, message.args, message.kwargs) == ("tasks.add", [2, 3], {})
    assert add.headers["ignore_result"] is None  # send_task's null, decoded as None
    assert protocol.decode(mul).name == "tasks.mul" and mul.headers["ignore_result"] is False
    echoed = protocol.decode(echo)
    assert (echoed.args, echoed.kwargs) == ([1], {"k": "v"})
    assert echo.properties["priority"] == 7
    assert 100_000 <= int(echo.properties["expiration"]) <= 120_000
    assert (echo.headers["x-custom"], echo.headers["tenant"]) == ("v", "t1")
    assert echo.headers["timelimit"] == [60, 50]
    assert echoed.eta is not None and echoed.eta > datetime.now(timezone.utc)
    for delivery in deliveries.values():
        await adapter.settle(delivery, Ack())


@pytest.mark.timeout(90)
async def test_celery_priorities_on_an_x_max_priority_queue_nine_first(
    amqp_url: str, celery_app: MakeApp, pumps: list[Pump]
) -> None:
    app = celery_app(amqp_url)
    app.conf.task_queue_max_priority = 10  # Celery declares celery with x-max-priority 10
    priorities = list(range(10))
    random.shuffle(priorities)
    await asyncio.to_thread(
        lambda: [app.send_task("tasks.add", (p, 0), priority=p) for p in priorities]
    )
    adapter = RabbitMQAdapter(amqp_url, max_priority=10)  # declares it the same way
    await adapter.connect()
    try:
        pumps.append(pump := Pump(adapter, ["celery"], 1))
        order = []
        for _ in priorities:
            (delivery,) = await pump.take(1, 30, "priority order")
            order.append(protocol.decode(delivery).args[0])
            await adapter.settle(delivery, Ack())
        assert order == list(range(9, -1, -1))
    finally:
        await adapter.close()


# -- our producer -> a Celery worker ----------------------------------------------------------


@pytest.mark.timeout(180)
async def test_celery_worker_runs_what_we_publish(
    amqp_url: str,
    adapter: RabbitMQAdapter,
    redis_server: RedisServer,
    celery_worker: StartWorker,
    celery_app: MakeApp,
) -> None:
    result_url = redis_server.url(3)
    await asyncio.to_thread(celery_worker, amqp_url, result_url)
    options = SendOptions(priority=3, headers={"tenant": "t1"}, expires=300, countdown=0.5,
                          time_limit=30)  # fmt: skip
    messages = [
        protocol.encode_task("tasks.add", (2, 3), {}, SendOptions(), origin="sq-test"),
        protocol.encode_task("tasks.echo", ("a",), {"k": [1, None]}, options, origin="sq-test"),
    ]
    for message in messages:
        await adapter.publish("celery", message)
    client = celery_app(amqp_url, result_url)
    add, echo = (client.AsyncResult(m.headers["id"]) for m in messages)
    assert await asyncio.to_thread(add.get, timeout=60) == 5
    assert await asyncio.to_thread(echo.get, timeout=60) == [["a"], {"k": [1, None]}]


@pytest.mark.timeout(180)
async def test_celery_worker_runs_a_message_we_parked_in_a_delay_queue(
    amqp_url: str,
    redis_server: RedisServer,
    celery_worker: StartWorker,
    celery_app: MakeApp,
    pumps: list[Pump],
) -> None:
    result_url = redis_server.url(4)
    client = celery_app(amqp_url, result_url)
    result = await asyncio.to_thread(client.send_task, "tasks.mul", (6, 7))
    adapter = RabbitMQAdapter(amqp_url)
    await adapter.connect()
    try:
        pumps.append(pump := Pump(adapter, ["celery"], 1))
        (delivery,) = await pump.take(1, 30, "Celery's message")
        await pump.stop()
        await adapter.settle(delivery, Requeue(delay_s=2.0))  # back on celery, with x-death
    finally:
        await adapter.close()
    await asyncio.to_thread(celery_worker, amqp_url, result_url)
    assert await asyncio.to_thread(result.get, timeout=60) == 42


# -- rpc:// result backend, both ways ---------------------------------------------------------


@pytest.mark.timeout(180)
async def test_celery_worker_replies_reach_our_rpc_backend(
    amqp_url: str, adapter: RabbitMQAdapter, rpc: RPCResultBackend, celery_worker: StartWorker
) -> None:
    await asyncio.to_thread(celery_worker, amqp_url, "rpc://")
    options = SendOptions(reply_to=rpc.reply_to)
    add = protocol.encode_task("tasks.add", (2, 3), {}, options, origin="sq-test")
    fail = protocol.encode_task("tasks.fail", ("rpc-boom",), {}, options, origin="sq-test")
    for message in (add, fail):
        await adapter.publish("celery", message)
    meta = await rpc.wait(add.headers["id"], timeout=60)
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 5, add.headers["id"])
    meta = await rpc.wait(fail.headers["id"], timeout=60)
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "ValueError"
    assert meta["result"]["exc_message"] == ["rpc-boom"]


@pytest.mark.timeout(120)
async def test_celery_client_get_reads_what_our_rpc_backend_stores(
    amqp_url: str,
    adapter: RabbitMQAdapter,
    rpc: RPCResultBackend,
    celery_thread: ThreadPoolExecutor,
    pumps: list[Pump],
) -> None:
    app = make_app(amqp_url, "rpc://")  # closed in the thread that used it
    ok = await in_thread(celery_thread, app.send_task, "tasks.add", (2, 3))
    bad = await in_thread(celery_thread, app.send_task, "tasks.fail", ("nope",))
    pumps.append(pump := Pump(adapter, ["celery"], 10))
    for delivery in await pump.take(2, 30, "Celery's rpc tasks"):
        message = protocol.decode(delivery)
        reply_to = delivery.properties["reply_to"]
        if message.name == "tasks.add":
            meta = success_meta(message.id, 5)
        else:
            meta = failure_meta(message.id, ValueError("nope"), traceback=None)
        await rpc.store(message.id, meta, reply_to=reply_to)
        await adapter.settle(delivery, Ack())
    try:
        assert await in_thread(celery_thread, ok.get, timeout=30) == 5
        with pytest.raises(ValueError, match="nope"):
            await in_thread(celery_thread, bad.get, timeout=30)
    finally:
        await in_thread(celery_thread, close_app, app)
