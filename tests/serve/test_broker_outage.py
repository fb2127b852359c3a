"""Health under a broker outage (real redis-server, stopped and started on the same port).

A short outage, inside ``health_grace_s``, leaves the replica healthy: the same process goes on
consuming when Redis is back. A long one makes ``check_health`` fail, so Serve replaces the
replica; once Redis is back the deployment is healthy again and new tasks complete. A replica
that starts while Redis is down reports itself unhealthy too, and consumes once it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from serve_queue import TaskQueue
from tests.ray_cluster import RayCluster
from tests.serve import apps
from tests.serve.conftest import ServeApps, deployment_status, eventually
from tests.servers import RedisServer

pytestmark = pytest.mark.serve

GRACE_S = 3.0
APP = "outage"


def fetch_errors_logged(cluster: RayCluster) -> int:
    """How many times replicas logged losing the broker while fetching (all Ray logs)."""
    count = 0
    for path in cluster.log_dir.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".err", ".out"):
            count += path.read_text(errors="replace").count("broker error while fetching")
    return count


def status(app: str = APP) -> str:
    overview = deployment_status(app)
    return "MISSING" if overview is None else str(overview.status.value)


def status_is(wanted: str, app: str = APP) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await asyncio.to_thread(status, app) == wanted

    return check


def failed_health_checks(app: str = APP) -> Callable[[], Awaitable[bool]]:
    """True once Serve marks the deployment UNHEALTHY because a health check failed."""

    def check() -> bool:
        overview = deployment_status(app)
        return (
            overview is not None
            and overview.status.value == "UNHEALTHY"
            and overview.status_trigger.value == "HEALTH_CHECK_FAILED"
        )

    async def poll() -> bool:
        return await asyncio.to_thread(check)

    return poll


async def watch_healthy(seconds: float) -> list[str]:
    """Every deployment status seen during ``seconds`` that was not HEALTHY."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        current = await asyncio.to_thread(status)
        if current != "HEALTHY":
            seen.append(current)
        await asyncio.sleep(0.25)
    return seen


async def run_once(queue: TaskQueue, key: str) -> int:
    """Send one quick task; the pid of the replica that ran it."""
    sent = await queue.send_task("serve_tests.work", args=[key, 0.0])
    result = await sent.get(timeout=60)
    return int(result["pid"])


@pytest.mark.timeout(300)
async def test_short_outage_keeps_the_replica_and_long_outage_replaces_it(
    ray_cluster: RayCluster,
    redis_server: RedisServer,
    redis_url: str,
    tmp_path: Path,
    serve_apps: ServeApps,
) -> None:
    queue = TaskQueue(redis_url, results=redis_server.url(1))
    journal = tmp_path / "journal"
    deployment = apps.worker_deployment(
        queue,
        consumer={"concurrency": 4, "health_grace_s": GRACE_S},
        health_check_period_s=1,
        health_check_timeout_s=10,
        graceful_shutdown_timeout_s=5,
    )
    handle = await serve_apps.run(deployment.bind(str(journal)), APP)
    pid = await handle.pid.remote()
    assert await run_once(queue, "before") == pid
    try:
        # within the grace: down for well under GRACE_S, noticed, survived
        errors_before = fetch_errors_logged(ray_cluster)
        await asyncio.to_thread(redis_server.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis_server.start)
        not_healthy = await watch_healthy(2 * GRACE_S + 3)  # grace + Serve's 3 failed checks
        assert not_healthy == [], f"a short outage made the deployment {not_healthy}"
        assert fetch_errors_logged(ray_cluster) > errors_before, "the outage went unnoticed"
        assert await handle.pid.remote() == pid
        assert await run_once(queue, "after-short") == pid

        # past the grace: check_health fails, Serve replaces the replica
        await asyncio.to_thread(redis_server.stop)
        await eventually(failed_health_checks(), timeout=60, what="failed health checks")
        await asyncio.to_thread(redis_server.start)
        await eventually(status_is("HEALTHY"), timeout=120, what="the deployment HEALTHY again")
        new_pid = await run_once(queue, "after-long")
        assert new_pid != pid
        assert await handle.pid.remote() == new_pid
    finally:
        if not redis_server.running():
            await asyncio.to_thread(redis_server.start)
        await queue.close()


@pytest.mark.timeout(240)
async def test_a_replica_started_during_an_outage_is_unhealthy_until_the_broker_returns(
    redis_server: RedisServer, redis_url: str, tmp_path: Path, serve_apps: ServeApps
) -> None:
    """Its consumer cannot even connect (the result store on the same Redis refuses): a
    replica that reported healthy here would sit idle for good once Redis is back."""
    queue = TaskQueue(redis_url, results=redis_server.url(1))
    journal = tmp_path / "journal"
    deployment = apps.worker_deployment(
        queue,
        consumer={"concurrency": 4, "health_grace_s": GRACE_S},
        health_check_period_s=1,
        graceful_shutdown_timeout_s=5,
    )
    await asyncio.to_thread(redis_server.stop)
    try:
        await serve_apps.start(deployment.bind(str(journal)), "cold")
        await eventually(failed_health_checks("cold"), timeout=90, what="failed health checks")
    finally:
        await asyncio.to_thread(redis_server.start)
    await eventually(status_is("HEALTHY", "cold"), timeout=120, what="cold HEALTHY again")
    pid = await run_once(queue, "after-cold-start")
    assert await serve_apps.handle("cold").pid.remote() == pid
    await queue.close()
