"""The session servers are real and isolated: each is reached with its own ordinary client."""

from __future__ import annotations

import uuid

import pytest

from tests.ray_cluster import RayCluster
from tests.servers import RabbitMQServer, RedisServer, SQSServer

pytestmark = pytest.mark.slow


async def test_redis_answers_and_each_test_starts_empty(
    redis_server: RedisServer, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping()
        assert await client.dbsize() == 0
        await client.set("smoke", "1")
        assert await client.get("smoke") == b"1"
    finally:
        await client.aclose()
    redis_server.flushall()
    assert redis_server.url(3).endswith(f":{redis_server.port}/3")


async def test_rabbitmq_vhost_round_trip(amqp_url: str, rabbitmq_server: RabbitMQServer) -> None:
    import aio_pika

    vhost = amqp_url.rsplit("/", 1)[1]
    assert vhost in rabbitmq_server.ctl("list_vhosts").split()
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("smoke", durable=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hello"), routing_key="smoke")
        message = await queue.get(timeout=5)
        assert message is not None
        assert message.body == b"hello"
        await message.ack()
    assert "smoke" in rabbitmq_server.ctl("list_queues", "-p", vhost, "name").split()


async def test_rabbitmq_restart_keeps_durable_messages(
    amqp_url: str, rabbitmq_server: RabbitMQServer
) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("kept", durable=True)
        persistent = aio_pika.Message(b"kept", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(persistent, routing_key="kept")
    rabbitmq_server.restart()
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("kept", durable=True)
        message = await queue.get(timeout=5)
        assert message is not None
        assert message.body == b"kept"
        await message.ack()


def test_sqs_create_and_list(sqs_server: SQSServer, sqs_url: str) -> None:
    import boto3

    client = boto3.client("sqs", endpoint_url=sqs_server.endpoint_url)
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    created = client.create_queue(QueueName=name)["QueueUrl"]
    assert created in client.list_queues().get("QueueUrls", [])
    sqs_server.reset()
    assert client.list_queues().get("QueueUrls", []) == []
    assert sqs_url == f"sqs://testing:testing@127.0.0.1:{sqs_server.port}"


@pytest.mark.serve
@pytest.mark.timeout(300)
def test_ray_serve_answers_http(ray_cluster: RayCluster) -> None:
    import httpx
    from ray import serve

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class Echo:
        async def __call__(self, request: object) -> str:
            return "pong"

    serve.run(Echo.bind(), name="smoke", route_prefix="/smoke")
    try:
        response = httpx.get(f"{ray_cluster.http_url}/smoke", timeout=30)
        assert response.status_code == 200
        assert response.text == "pong"
    finally:
        serve.delete("smoke")


async def test_rabbitmq_consumer_timeout_hook_closes_a_stuck_channel(
    amqp_url: str, rabbitmq_server: RabbitMQServer
) -> None:
    import asyncio

    import aio_pika

    rabbitmq_server.set_consumer_timeout(1000)
    try:
        connection = await aio_pika.connect(amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("stuck")
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key="stuck")
            closed = asyncio.get_running_loop().create_future()
            channel.close_callbacks.add(lambda _channel, exc: closed.set_result(exc))
            assert await queue.get(timeout=5) is not None  # held, never acked
            reason = await asyncio.wait_for(closed, timeout=30)
            assert "PRECONDITION_FAILED" in repr(reason)
    finally:
        rabbitmq_server.set_consumer_timeout(None)
