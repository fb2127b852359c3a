"""The consumer decorator: handlers found on their own, results readable, the class still a
plain class outside Serve, and a clear error for two handlers of one task."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import pytest

from serve_queue import ConfigurationError, TaskQueue, task
from serve_queue.serve import replica_consumer
from tests.serve import apps
from tests.serve.conftest import ServeApps


def test_two_handlers_for_one_task_name_fail_at_decoration(tmp_path: Path) -> None:
    queue = TaskQueue(f"sqlite:///{tmp_path}/b.db")

    class Twice:
        @task("resize")
        async def resize(self, path: str) -> str:
            return path

        @task("resize")
        def resize_again(self, path: str) -> str:
            return path

    with pytest.raises(ConfigurationError) as caught:
        queue.consumer()(Twice)
    message = str(caught.value)
    assert "two handlers for task 'resize'" in message
    assert "resize_again" in message
    assert "Twice" in message


def test_a_class_without_handlers_fails_at_decoration(tmp_path: Path) -> None:
    queue = TaskQueue(f"sqlite:///{tmp_path}/b.db")

    class Empty:
        async def helper(self) -> None: ...

    with pytest.raises(ConfigurationError, match="Empty has no @task methods"):
        queue.consumer()(Empty)


async def test_the_deployment_class_is_a_plain_class_outside_a_replica(tmp_path: Path) -> None:
    """Instantiated directly (as in a unit test), with an event loop running: handlers are
    plain methods and no consumer starts; dropping the object leaves nothing behind."""
    queue = TaskQueue(f"sqlite:///{tmp_path}/b.db")
    journal = tmp_path / "journal"
    deployment = apps.worker_deployment(queue, consumer={"concurrency": 2})
    worker = deployment.func_or_class(str(journal))

    outcome = await worker.work("k1", 0)
    assert outcome == {"key": "k1", "pid": os.getpid(), "loop": id(asyncio.get_running_loop())}
    assert worker.multiply(6, 7) == 42
    assert [e.event for e in apps.journal_read(journal)] == ["start", "done"]
    consumer = replica_consumer(worker)
    assert consumer.registry.names() == ["serve_tests.multiply", "serve_tests.work"]
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(n.startswith("serve-queue") for n in names), names
    assert (await queue.depth()).total == 0  # nothing was sent, nothing was consumed

    del worker, consumer
    gc.collect()  # an un-awaited async __del__ would surface here as an unraisable warning


@pytest.mark.serve
@pytest.mark.timeout(180)
async def test_a_replica_consumes_every_handler_on_its_own_loop(
    tmp_path: Path, serve_apps: ServeApps
) -> None:
    """Deployed: both handlers (async and blocking) are registered without being listed,
    run on the loop that serves the replica's own methods, and their results are readable."""
    queue = TaskQueue(f"sqlite:///{tmp_path}/b.db")
    journal = tmp_path / "journal"
    app = apps.worker_deployment(queue, consumer={"concurrency": 4}).bind(str(journal))
    handle = await serve_apps.run(app, "registration")
    try:
        work = await queue.send_task("serve_tests.work", args=["a", 0.2])
        product = await queue.send_task("serve_tests.multiply", args=[6, 7])
        assert await product.get(timeout=60) == 42
        result = await work.get(timeout=60)
        assert await queue.result(work.id).state() == "SUCCESS"
        assert result == {
            "key": "a",
            "pid": await handle.pid.remote(),
            "loop": await handle.loop_id.remote(),
        }
        assert await handle.task_names.remote() == ["serve_tests.multiply", "serve_tests.work"]
        await handle.check_health.remote()  # healthy: returns without raising
        stats = await handle.backlog_stats.remote()
        assert stats["serve_queue_backlog"] == 0
    finally:
        await queue.close()
