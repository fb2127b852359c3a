"""A real Celery 5.7 application, the interop peer of serve_queue.

A worker runs it as ``celery -A tests.interop.celeryapp worker`` with the broker and result
backend taken from ``SQ_BROKER_URL`` / ``SQ_RESULT_URL`` (and optional JSON transport options
in ``SQ_TRANSPORT_OPTIONS``); tests build producer apps with ``make_app``. Tasks:
``tasks.add(x, y)``, ``tasks.mul(x, y)``, ``tasks.fail(msg)`` (raises ``ValueError(msg)``),
``tasks.echo(*args, **kwargs)`` (returns ``[args, kwargs]``), ``tasks.sleep(s)``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

from celery import Celery


def transport_options(broker_url: str) -> dict[str, Any]:
    """Broker transport options for a test URL: plain HTTP for a local SQS endpoint."""
    options: dict[str, Any] = json.loads(os.environ.get("SQ_TRANSPORT_OPTIONS") or "{}")
    if urlsplit(broker_url).scheme == "sqs":
        options.setdefault("is_secure", False)
        options.setdefault("region", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return options


class TrackedCelery(Celery):
    """A Celery app that remembers every result backend it builds.

    Celery keeps a non-thread-safe backend (Redis, rpc://) per thread, so the backend a test
    used from ``asyncio.to_thread`` is not the one ``app.backend`` returns to the thread that
    closes the app; ``backends`` lets teardown close them all, not leave sockets to the GC.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.backends: list[Any] = []
        super().__init__(*args, **kwargs)

    def _get_backend(self) -> Any:
        backend = super()._get_backend()
        self.backends.append(backend)
        return backend


def make_app(broker_url: str, result_url: str | None, *, name: str = "sqtest") -> TrackedCelery:
    """A Celery app (JSON only) with the five test tasks registered under ``tasks.*``."""
    app = TrackedCelery(name, broker=broker_url, backend=result_url or None, set_as_current=False)
    app.conf.update(
        accept_content=["json"],
        result_accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        enable_utc=True,
        timezone="UTC",
        broker_connection_retry_on_startup=True,
        # No AMQP heartbeat timer: with one, the worker's loop sleeps up to 10 s between
        # checks for a shutdown request, and every test teardown would wait that long.
        broker_heartbeat=0,
        broker_transport_options=transport_options(broker_url),
        worker_hijack_root_logger=False,
    )
    register_tasks(app)
    return app


def register_tasks(app: Celery) -> None:
    """Register the test tasks on ``app`` by their wire names."""

    @app.task(name="tasks.add", shared=False)
    def add(x: Any, y: Any) -> Any:
        return x + y

    @app.task(name="tasks.mul", shared=False)
    def mul(x: Any, y: Any) -> Any:
        return x * y

    @app.task(name="tasks.fail", shared=False)
    def fail(msg: str) -> None:
        raise ValueError(msg)

    @app.task(name="tasks.echo", shared=False)
    def echo(*args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    @app.task(name="tasks.sleep", shared=False)
    def sleep(s: float) -> float:
        time.sleep(s)
        return s


app = make_app(
    os.environ.get("SQ_BROKER_URL", "memory://"),
    os.environ.get("SQ_RESULT_URL") or None,
)
