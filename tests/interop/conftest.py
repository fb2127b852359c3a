"""Real Celery 5.7 peers for interop tests: a worker subprocess and producer/client apps.

``celery_worker(broker_url, result_url, queues=("celery",), pool="solo", concurrency=1)``
starts ``celery -A tests.interop.celeryapp worker`` and returns once it logged "ready";
``celery_app(broker_url, result_url)`` returns a configured ``celery.Celery`` for
``send_task`` / ``AsyncResult``. Both are stopped or closed when the test ends.
"""

from __future__ import annotations

import gc
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import kombu.pools
import pytest
from celery import Celery

from tests.interop.celeryapp import TrackedCelery, make_app
from tests.servers import Process

ROOT = Path(__file__).resolve().parents[2]


class CeleryWorker:
    """A running ``celery worker`` subprocess: ``.hostname``, ``.log``, ``.output()``."""

    def __init__(self, process: Process, hostname: str) -> None:
        self.process = process
        self.hostname = hostname
        self.log = process.log

    def output(self) -> str:
        """Everything the worker has logged so far."""
        return self.log.read_text(errors="replace")

    def dump_stacks(self) -> None:
        """Make the worker log every thread's stack (Celery's SIGUSR1 handler)."""
        self.process.signal(signal.SIGUSR1)
        time.sleep(1.0)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        self.process.stop(grace=15.0)


class StartWorker(Protocol):
    def __call__(
        self,
        broker_url: str,
        result_url: str | None = None,
        queues: Sequence[str] = ("celery",),
        pool: Literal["solo", "threads", "prefork"] = "solo",
        concurrency: int = 1,
        timeout: float = 60.0,
    ) -> CeleryWorker: ...


class MakeApp(Protocol):
    def __call__(self, broker_url: str, result_url: str | None = None) -> Celery: ...


def worker_argv(hostname: str, queues: Sequence[str], pool: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "tests.interop.celeryapp", "worker",
        "--hostname", hostname,
        "--queues", ",".join(queues),
        "--pool", pool,
        "--concurrency", str(concurrency),
        "--loglevel", "INFO",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ]  # fmt: skip


@pytest.fixture
def celery_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Factory: start a real Celery worker on ``broker_url``; all are stopped after the test."""
    workers: list[CeleryWorker] = []

    def start(
        broker_url: str,
        result_url: str | None = None,
        queues: Sequence[str] = ("celery",),
        pool: Literal["solo", "threads", "prefork"] = "solo",
        concurrency: int = 1,
        timeout: float = 60.0,
    ) -> CeleryWorker:
        hostname = f"sqtest-{secrets.token_hex(4)}@localhost"
        env = {
            **os.environ,
            "SQ_BROKER_URL": broker_url,
            "SQ_RESULT_URL": result_url or "",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        log = tmp_path / f"celery-worker-{len(workers)}.log"
        argv = worker_argv(hostname, queues, pool, concurrency)
        worker = CeleryWorker(Process("celery worker", argv, log, env=env, cwd=ROOT), hostname)
        workers.append(worker)
        worker.process.wait_until(
            lambda: f"{hostname} ready." in worker.output(),
            timeout,
            "ready",
            on_timeout=worker.dump_stacks,
        )
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def celery_app() -> Iterator[MakeApp]:
    """Factory: a Celery producer/client app (JSON, the ``tasks.*`` tasks registered)."""
    apps: list[TrackedCelery] = []

    def make(broker_url: str, result_url: str | None = None) -> Celery:
        app = make_app(broker_url, result_url)
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)


def close_app(app: TrackedCelery) -> None:
    """Close every connection ``app`` opened, from any thread, so no socket is left for the
    garbage collector."""
    gc.collect()  # pending AsyncResult.__del__ unsubscribe now, while the servers are up
    for backend in app.backends:
        close_backend(backend)
    app.close()
    kombu.pools.reset()  # Celery's broker connections live in kombu's process-wide pools


def close_backend(backend: Any) -> None:
    """Close a Celery result backend's connections: the Redis client and its pub/sub, or the
    connection an rpc:// client reads replies on (its ``ResultConsumer.stop()`` fails once
    the consumer is gone, so the connection is closed directly)."""
    consumer = backend.__dict__.get("result_consumer")
    if consumer is not None and hasattr(consumer, "_pubsub"):
        consumer.stop()
        consumer._pubsub = None  # a later AsyncResult.__del__ must not reconnect
    elif consumer is not None and hasattr(consumer, "_connection"):
        connection, consumer._connection, consumer._consumer = consumer._connection, None, None
        if connection is not None:
            connection.close()
    client = backend.__dict__.get("client")  # the backend's redis client, if it made one
    if client is not None:
        client.connection_pool.disconnect()
