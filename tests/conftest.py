"""Session-wide real servers on loopback (see ``tests/servers.py``) and per-test clean views.

Servers start lazily, the first time a test asks for one, and stop at the end of the session.
A server that cannot start skips the tests that need it, except under ``CI=true`` where it is
a failure: CI must never go green by skipping the real-broker tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.adapters.contract import Pump
from tests.ray_cluster import RayCluster
from tests.servers import RabbitMQServer, RedisServer, ServerUnavailable, SQSServer


def in_ci() -> bool:
    """Whether this run is CI (``CI=true``), where missing servers fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def start_or_skip(start: Callable[[], None], what: str) -> None:
    """Run ``start``; if the server is unavailable, skip (locally) or fail (in CI)."""
    try:
        start()
    except ServerUnavailable as exc:
        if in_ci():
            pytest.fail(f"{what} could not start (CI=true): {exc}", pytrace=False)
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """``redis-server`` for the session: ``.port``, ``.url(db=0)``, ``.flushall()``,
    ``.restart()``, ``.stop()``/``.start()``."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        start_or_skip(server.start, "redis-server")
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0``, every db flushed first (other dbs: ``redis_server.url(n)``)."""
    if not redis_server.running():  # a previous test stopped it without restarting
        start_or_skip(redis_server.start, "redis-server")
    redis_server.flushall()
    return redis_server.url(0)


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """A private RabbitMQ node: ``.url`` (default vhost), ``.port``, ``.ctl(*args)``,
    ``.restart()``, ``.stop()``/``.start()``, ``.add_vhost()``, ``.vhost_url(v)``,
    ``.set_consumer_timeout(ms)``."""
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"))
    try:
        start_or_skip(server.start, "rabbitmq-server")
        yield server
    finally:
        server.close()


@pytest.fixture
def amqp_url(rabbitmq_server: RabbitMQServer) -> Iterator[str]:
    """An AMQP URL on a fresh vhost of its own, deleted (with its queues) after the test."""
    if not rabbitmq_server.running():  # a previous test stopped it without restarting
        start_or_skip(rabbitmq_server.start, "rabbitmq-server")
    vhost = rabbitmq_server.add_vhost()
    yield rabbitmq_server.vhost_url(vhost)
    if rabbitmq_server.running():
        rabbitmq_server.delete_vhost(vhost)


@pytest.fixture(scope="session")
def sqs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQSServer]:
    """``moto_server`` as SQS: ``.endpoint_url``, ``.url`` (``sqs://testing:testing@...``),
    ``.reset()``; the AWS credentials/region variables are set for the whole session."""
    server = SQSServer(tmp_path_factory.mktemp("sqs"))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.aws_environment().items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            start_or_skip(server.start, "moto_server")
            yield server
        finally:
            server.close()


@pytest.fixture
def sqs_url(sqs_server: SQSServer) -> str:
    """The SQS broker URL, with every queue and message of earlier tests forgotten."""
    sqs_server.reset()
    return sqs_server.url


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """One local Ray cluster (4 logical CPUs) with Serve, shared by the whole session.

    ``.http_url`` is Serve's HTTP proxy (``http://127.0.0.1:PORT``), ``.address`` the GCS
    address, ``.log_dir`` the logs. The cluster is shared: every test must delete the Serve
    applications it deploys (``serve.delete(name)``) and kill the actors it creates, or later
    tests will see them.
    """
    cluster = RayCluster()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RayCluster.environment.items():
            patch.setenv(name, value)
        patch.delenv("RAY_ADDRESS", raising=False)
        try:
            start_or_skip(cluster.start, "ray")
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture
async def pumps() -> AsyncIterator[list[Pump]]:
    """Consumers a test starts (``Pump`` from the contract suite), stopped when it ends."""
    made: list[Pump] = []
    yield made
    for pump in made:
        await pump.stop()
