"""The Celery peer itself works on every broker serve_queue has an adapter for, so interop
failures point at serve_queue.

SQS is not among them: there is no SQS adapter yet (``TaskQueue("sqs://...")`` is refused),
so a Celery-on-SQS check would test Celery alone; add it back with the adapter.
"""

from __future__ import annotations

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from tests.interop.conftest import MakeApp, StartWorker
from tests.servers import RedisServer

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    fixture = {"redis": "redis_url", "amqp": "amqp_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.mark.timeout(180)
def test_celery_worker_runs_the_test_tasks(
    broker_url: str,
    redis_server: RedisServer,
    celery_worker: StartWorker,
    celery_app: MakeApp,
) -> None:
    result_url = redis_server.url(1)
    redis_server.flushall()
    worker = celery_worker(broker_url, result_url, pool="threads", concurrency=2)
    app = celery_app(broker_url, result_url)
    assert app.send_task("tasks.add", (2, 3)).get(timeout=30) == 5
    assert app.tasks["tasks.mul"].delay(4, 5).get(timeout=30) == 20
    echoed = app.send_task("tasks.echo", (1, "a"), {"k": [1]}).get(timeout=30)
    assert echoed == [[1, "a"], {"k": [1]}]
    failed = app.send_task("tasks.fail", ("boom",))
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=30)
    assert failed.state == "FAILURE"
    assert "tasks.fail" in worker.output()


def test_result_wait_times_out_without_a_worker(
    redis_url: str, redis_server: RedisServer, celery_app: MakeApp
) -> None:
    app = celery_app(redis_url, redis_server.url(1))
    with pytest.raises(CeleryTimeout):
        app.send_task("tasks.add", (1, 1)).get(timeout=0.5)
