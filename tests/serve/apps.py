"""Consumer deployments for the Serve tests, built per test from a ``TaskQueue``.

The handler class lives here, at module level, so replicas import it by name (``tests`` is on
the driver's ``sys.path``, which Ray gives its workers). ``queue.consumer(...)`` subclasses it;
Ray ships that subclass by value with the queue's settings, so every test can point its
deployment at its own broker.

Handlers write what they do to a journal, an append-only text file shared by every process on
the machine: one line ``event key pid`` per event, so a test can count how often each task ran
and on which replica process, across replicas that were stopped or killed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_queue import TaskQueue, task
from serve_queue.serve import replica_consumer

#: every replica here costs no CPU slot: the test cluster has 4 logical CPUs and 2 real cores
ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 0}


def journal_write(path: str, event: str, key: str) -> None:
    """Append one ``event key pid`` line; a single small O_APPEND write is atomic on Linux."""
    line = f"{event} {key} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    event: str
    key: str
    pid: int


def journal_read(path: Path) -> list[Entry]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        event, key, pid = line.split()
        entries.append(Entry(event, key, int(pid)))
    return entries


def journal_counts(path: Path, event: str) -> Counter[str]:
    """How many times each key has ``event`` in the journal."""
    return Counter(e.key for e in journal_read(path) if e.event == event)


class Worker:
    """The handlers, plus plain methods the tests call through a ``DeploymentHandle``."""

    def __init__(self, journal: str) -> None:
        self.journal = journal
        self.config: dict[str, Any] = {}

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config`` hook (the tests roll out new versions through it)."""
        self.config = dict(config)

    @task("serve_tests.work")
    async def work(self, key: str, seconds: float) -> dict[str, Any]:
        """Journal ``start``, sleep ``seconds`` on the replica's loop, journal ``done``."""
        journal_write(self.journal, "start", key)
        await asyncio.sleep(seconds)
        journal_write(self.journal, "done", key)
        return {"key": key, "pid": os.getpid(), "loop": id(asyncio.get_running_loop())}

    @task("serve_tests.multiply")
    def multiply(self, x: int, y: int) -> int:
        """A blocking handler: runs on the consumer's thread pool."""
        time.sleep(0.01)
        return x * y

    async def pid(self) -> int:
        return os.getpid()

    async def loop_id(self) -> int:
        """The event loop Serve runs this replica's methods on."""
        return id(asyncio.get_running_loop())

    async def task_names(self) -> list[str]:
        return replica_consumer(self).registry.names()

    async def backlog_stats(self) -> dict[str, float]:
        """What this replica reports to Serve's autoscaler right now."""
        stats: dict[str, float] = await self.record_autoscaling_stats()  # type: ignore[attr-defined]
        return stats

    async def consumer_health(self) -> tuple[bool, str]:
        health = replica_consumer(self).health()
        return health.ok, health.reason


def worker_deployment(
    queue: TaskQueue, *, consumer: dict[str, Any] | None = None, **deployment: Any
) -> Any:
    """``Worker`` as a Serve deployment consuming ``queue``; bind it to a journal path.

    ``consumer``: options for ``queue.consumer(...)``; ``deployment``: ``serve.deployment``
    options (no CPU slot unless ``ray_actor_options`` says otherwise)."""
    from ray import serve

    cls = queue.consumer(**(consumer or {}))(Worker)
    deployment.setdefault("ray_actor_options", ACTOR_OPTIONS)
    return serve.deployment(cls, name="Worker", **deployment)
