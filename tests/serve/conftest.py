"""Fixtures for the Serve integration tests: they all share the session's one Ray cluster."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.ray_cluster import RayCluster


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float, what: str, every: float = 0.2
) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


def deployment_status(app: str, deployment: str = "Worker") -> Any:
    """Serve's status overview of one deployment (``.status``, ``.replica_states``...)."""
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None:
        return None
    return application.deployments.get(deployment)


def running_replicas(app: str, deployment: str = "Worker") -> int:
    status = deployment_status(app, deployment)
    return 0 if status is None else int(status.replica_states.get("RUNNING", 0))


class ServeApps:
    """Deploys Serve applications for one test and deletes every one of them afterwards."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def run(self, app: Any, name: str) -> Any:
        """``serve.run(app, name=name)`` off the event loop; returns the ingress handle."""
        from ray import serve

        if name not in self.names:
            self.names.append(name)
        return await asyncio.to_thread(serve.run, app, name=name, route_prefix=None)

    async def start(self, app: Any, name: str) -> None:
        """Deploy without waiting for the app to be running (it may never be healthy)."""
        from ray.serve.api import _run

        if name not in self.names:
            self.names.append(name)
        await asyncio.to_thread(_run, app, _blocking=False, name=name, route_prefix=None)

    def handle(self, name: str) -> Any:
        """A handle on the ingress deployment of app ``name``."""
        from ray import serve

        return serve.get_app_handle(name)

    async def delete(self, name: str) -> None:
        from ray import serve

        await asyncio.to_thread(serve.delete, name)
        self.names.remove(name)

    async def delete_all(self) -> None:
        from ray import serve

        for name in list(self.names):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(serve.delete, name)
        self.names.clear()


@pytest.fixture
async def serve_apps(ray_cluster: RayCluster) -> AsyncIterator[ServeApps]:
    """Deploy with ``await serve_apps.run(app, name)``; all of them are deleted at the end."""
    apps = ServeApps()
    try:
        yield apps
    finally:
        await apps.delete_all()
