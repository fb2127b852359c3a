"""Autoscaling on backlog with ``queue.autoscaling_policy(...)`` on the real local cluster:
from zero replicas up to the maximum while a backlog waits, and back to zero once it drains.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from ray.serve.config import AutoscalingConfig

from serve_queue import BacklogPolicy, TaskQueue
from tests.serve import apps
from tests.serve.conftest import ServeApps, eventually, running_replicas

APP = "autoscale"


async def replicas() -> int:
    return await asyncio.to_thread(running_replicas, APP)


def test_the_policy_carries_the_queue_but_serve_shows_no_password() -> None:
    queue = TaskQueue("redis://:s3cret@127.0.0.1:6399/0", default_queue="jobs")
    policy = queue.autoscaling_policy(target_per_replica=5)
    config = AutoscalingConfig(min_replicas=0, max_replicas=4, policy=policy)
    shown = json.dumps(config.model_dump(mode="json"))
    assert "s3cret" not in shown
    assert "redis://:***@127.0.0.1:6399/0" in shown
    assert policy.policy_kwargs["target_per_replica"] == 5
    instance = policy.get_policy()  # what Serve's controller runs (unpickled from bytes)
    assert isinstance(instance, BacklogPolicy)
    assert instance.queues == ("jobs",)
    assert isinstance(instance.queue, TaskQueue)
    assert "s3cret" in instance.queue.broker_url.render(reveal=True)  # it can connect
    # a changed setting is a changed config to Serve (it compares the shown fields)
    assert policy != queue.autoscaling_policy(target_per_replica=6)


@pytest.mark.serve
@pytest.mark.timeout(300)
async def test_backlog_scales_from_zero_to_max_and_back_to_zero(
    tmp_path: Path, serve_apps: ServeApps
) -> None:
    queue = TaskQueue(f"sqlite:///{tmp_path}/b.db")
    journal = tmp_path / "journal"
    autoscaling = AutoscalingConfig(
        min_replicas=0,
        max_replicas=3,
        upscale_delay_s=0.5,
        downscale_delay_s=2,
        policy=queue.autoscaling_policy(target_per_replica=4, poll_interval_s=0.5),
    )
    deployment = apps.worker_deployment(
        queue, consumer={"concurrency": 2}, autoscaling_config=autoscaling
    )
    # no handle call before the backlog: a request to a deployment at zero replicas would
    # start one by itself (Serve's cold start), whatever the policy says
    await serve_apps.run(deployment.bind(str(journal)), APP)
    assert await replicas() == 0

    # a task due in 10 minutes is parked (delayed): reported, but it is no work for now
    later = await queue.send_task("serve_tests.work", args=["later", 0.0], countdown=600)
    sent = [
        (await queue.send_task("serve_tests.work", args=[f"b{i:02d}", 1.0])).id for i in range(60)
    ]
    seen: set[int] = set()

    async def at_max() -> bool:
        seen.add(await replicas())
        return 3 in seen

    await eventually(at_max, timeout=90, what="3 replicas running for the backlog")

    handle = serve_apps.handle(APP)
    stats = await handle.backlog_stats.remote()
    assert {"serve_queue_ready", "serve_queue_reserved", "serve_queue_delayed"} <= set(stats)
    assert stats["serve_queue_backlog"] == (
        stats["serve_queue_ready"] + stats["serve_queue_reserved"] + stats["serve_queue_delayed"]
    )
    assert stats["serve_queue_reserved"] >= 1  # this replica's running tasks, at least
    assert stats["serve_queue_ready"] >= 1  # still waiting: 60 s of work on 6 slots
    assert stats["serve_queue_oldest_age_s"] > 0
    assert stats["serve_queue_running"] >= 1

    async def backlog_done() -> bool:
        depth = await queue.depth()
        return depth.ready + depth.reserved == 0

    await eventually(backlog_done, timeout=120, what="the backlog drained")
    depth = await queue.depth()
    assert depth.delayed == 1  # the parked task is still there, and holds no replica up
    stats = await handle.backlog_stats.remote()
    assert stats["serve_queue_delayed"] == 1
    assert stats["serve_queue_ready"] + stats["serve_queue_reserved"] == 0

    async def at_zero() -> bool:
        return await replicas() == 0

    await eventually(at_zero, timeout=90, what="scaled back to zero replicas")
    for task_id in sent:
        assert await queue.result(task_id).state() == "SUCCESS"
    assert await queue.result(later.id).state() == "PENDING"
    pids = {e.pid for e in apps.journal_read(journal) if e.event == "done"}
    assert len(pids) >= 3, "the backlog was not shared by three replica processes"
    await queue.close()
