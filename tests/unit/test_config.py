"""Settings: URL parsing, schemes refused when the queue is built, and a password never shown
in reprs, errors or logs."""

from __future__ import annotations

import logging
import sys

import pytest

from serve_queue import (
    BrokerUnavailable,
    BrokerURL,
    ConfigurationError,
    MissingDependency,
    TaskQueue,
    task,
)
from serve_queue.config import ConsumerConfig, RetryPolicy, redact_url

SECRET = "s3cr3t-p@ss"
URL = "redis://user:s3cr3t-p%40ss@127.0.0.1:1/0"


def test_parse_keeps_parts_and_hides_the_password() -> None:
    url = BrokerURL.parse(URL)
    assert (url.scheme, url.host, url.port, url.username, url.path) == (
        "redis",
        "127.0.0.1",
        1,
        "user",
        "0",
    )
    assert url.password is not None and url.password.get_secret_value() == SECRET
    for shown in (str(url), repr(url), url.model_dump_json(), repr(url.model_dump())):
        assert SECRET not in shown and "s3cr3t" not in shown
    assert url.render(reveal=True) == URL


def test_sqlite_paths_and_queries() -> None:
    assert BrokerURL.parse("sqlite:////tmp/x.db").path == "//tmp/x.db"
    assert BrokerURL.parse("redis://h/0?ssl_cert_reqs=none").query == {"ssl_cert_reqs": "none"}


@pytest.mark.parametrize("bad", ["no-scheme", "redis://user:pw@host:notaport/0"])
def test_bad_urls_are_configuration_errors_without_the_password(bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        BrokerURL.parse(bad)
    assert "pw@" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("amqp://guest:guest@127.0.0.1:5672//") == "amqp://guest:***@127.0.0.1:5672//"
    assert redact_url("redis://127.0.0.1/0") == "redis://127.0.0.1/0"


def test_task_queue_repr_and_pickle_hide_nothing_they_should_not() -> None:
    queue = TaskQueue(URL, results=URL.replace("/0", "/1"))
    assert SECRET not in repr(queue)
    assert "s3cr3t" not in repr(queue)


SUPPORTED = "supported: amqp, amqps, memory, pyamqp, redis, rediss, sqlite"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://h", "unknown broker scheme 'kafka'"),
        ("sqs://key:secret@", "broker scheme 'sqs' is not supported: there is no SQS adapter yet"),
        ("kombu+sqs://", "'kombu+sqs' is not supported: there is no generic kombu-transport"),
    ],
)
def test_a_broker_scheme_nothing_serves_fails_at_construction(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TaskQueue(url)
    assert says in str(info.value)
    assert SUPPORTED in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "blocked", "extra"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "aio_pika", "rabbitmq"),
        ("rediss://127.0.0.1:6379/0", "redis", "redis"),
    ],
)
def test_a_broker_without_its_client_names_the_extra_at_construction(
    monkeypatch: pytest.MonkeyPatch, url: str, blocked: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # as if not installed: import fails
    with pytest.raises(MissingDependency, match=rf"pip install 'serve-queue\[{extra}\]'"):
        TaskQueue(url)


def test_a_results_url_nothing_serves_fails_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigurationError, match="unknown result backend scheme 'mongodb'"):
        TaskQueue("memory://", results="mongodb://h/")
    with pytest.raises(ConfigurationError, match="rpc:// results need an AMQP broker"):
        TaskQueue("memory://", results="rpc://")
    assert TaskQueue("amqp://guest:guest@127.0.0.1:5672//", results="rpc://").results_url
    assert TaskQueue("memory://", results="none").results_url is None
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingDependency, match=r"serve-queue\[redis\]"):
        TaskQueue("memory://", results="redis://127.0.0.1:6379/1")


def test_bad_consumer_settings() -> None:
    with pytest.raises(ConfigurationError, match="concurrency"):
        TaskQueue("memory://").worker(concurrency=0)


def test_retry_policy_is_bounded() -> None:
    assert RetryPolicy(
        max_retries=4, interval_start=0, interval_step=1, interval_max=2
    ).delays() == [0, 1, 2, 2]
    assert ConsumerConfig(concurrency=7).effective_prefetch == 7


class Adder:
    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:
        return x + y


async def test_an_unreachable_broker_never_shows_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    queue = TaskQueue(URL, retry_policy=RetryPolicy(max_retries=1, interval_step=0.01))
    with pytest.raises(BrokerUnavailable) as info:
        await queue.send_task("tasks.add", args=[1, 2])
    assert SECRET not in str(info.value) and "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in caplog.text
    worker = queue.worker(Adder(), health_grace_s=0)
    assert "s3cr3t" not in repr(worker.adapter)


async def test_publish_is_retried_within_the_policy() -> None:
    queue = TaskQueue(
        "memory://",
        results="memory://",
        retry_policy=RetryPolicy(max_retries=2, interval_step=0.01),
    )
    broker = queue.broker_options["broker"]
    broker.faults.fail_publishes(2)
    async with queue.worker(Adder()):
        result = await queue.send_task("tasks.add", args=[1, 2])  # two failures, third try
        assert await result.get(timeout=5) == 3
        broker.faults.fail_publishes(3)
        with pytest.raises(BrokerUnavailable):
            await queue.send_task("tasks.add", args=[1, 2])
    await queue.close()
