"""What every scenario needs: the broker, consumer subprocesses, a backlog, a drain clock.

- ``Bench`` owns the temp dir and the broker server (its own ``redis-server`` on a free
  loopback port, launched by ``tests.servers``), and starts consumers as subprocesses in their
  own process groups (killed with the harness if it dies).
- A backlog is built once with serve_queue's codec (Celery protocol v2 messages in kombu's
  Redis envelope, byte-compatible with what Celery's ``send_task`` writes) in a spare database
  and handed to the consumer with one ``MOVE`` once it is ready, so that process start-up is
  never timed and every side drains exactly the same messages.
- ``drain`` times from that ``MOVE`` until the queue lists, the in-flight records and (with
  results) the stored results say every message was processed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from serve_queue import protocol
from serve_queue.adapters._redis_envelope import encode_envelope
from tests.servers import Process, RedisServer, ServerUnavailable

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "celery"
BROKER_DB, RESULTS_DB, BACKLOG_DB = 0, 1, 2
#: every list a message may sit on before it is in flight (kombu priorities; our consumers'
#: staging lists are registered in STAGINGS)
READY_KEYS = (QUEUE, *(f"{QUEUE}\x06\x16{s}" for s in (3, 6, 9)))
STAGINGS = "serve_queue.stagings"
_ORIGIN = f"gen{os.getpid()}@bench"


class RunFailed(Exception):
    """A run could not be measured (a consumer did not start, a drain stalled, ...)."""


def envelope(name: str, args: list[Any]) -> bytes:
    """One list item as a Celery producer would push it for ``name(*args)``."""
    message = protocol.encode_task(name, args, {}, protocol.SendOptions(), origin=_ORIGIN)
    return encode_envelope(QUEUE, message)


@dataclass
class Consumer:
    """A consumer subprocess: its process group, log, and the files it writes."""

    label: str
    process: Process
    workdir: Path
    ready_file: Path
    latency_file: Path

    def pids(self) -> list[int]:
        """The consumer's processes (the launcher's guard excluded)."""
        with contextlib.suppress(psutil.Error):
            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        return []

    def rss(self) -> int:
        """Resident memory of every process of the consumer, in bytes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        return total

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the consumer's processes."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> None:
        self.process.stop(grace=15.0)


@dataclass
class Bench:
    """The broker and the temp dir of one benchmark session."""

    workdir: Path
    server: RedisServer
    started: list[Consumer] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def open(cls) -> Iterator[Bench]:
        with tempfile.TemporaryDirectory(prefix="sqbench-") as tmp:
            workdir = Path(tmp)
            server = RedisServer(workdir)
            try:
                server.start()
            except ServerUnavailable as exc:
                raise SystemExit(f"cannot start redis-server: {exc}") from None
            bench = cls(workdir, server)
            try:
                yield bench
            finally:
                for consumer in bench.started:
                    consumer.stop()
                server.stop()

    def url(self, db: int) -> str:
        return self.server.url(db)

    def client(self, db: int = BROKER_DB) -> redis.Redis:
        return redis.Redis(port=self.server.port, host="127.0.0.1", db=db)

    def flush(self) -> None:
        self.client().flushall()

    # -- consumers -----------------------------------------------------------------------

    def start_consumer(
        self, label: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> Consumer:
        """Start ``argv`` (a consumer) and wait until it created its ready file."""
        n = len(self.started)
        ready, latency = self.workdir / f"ready-{n}", self.workdir / f"latency-{n}.json"
        full_env = {
            **os.environ,
            **(env or {}),
            "BENCH_READY_FILE": str(ready),
            "BENCH_LATENCY_FILE": str(latency),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        argv = [a.replace("{ready}", str(ready)).replace("{latency}", str(latency)) for a in argv]
        log = self.workdir / f"consumer-{n}.log"
        process = Process(label, list(argv), log, env=full_env, cwd=ROOT)
        consumer = Consumer(label, process, self.workdir, ready, latency)
        self.started.append(consumer)
        try:
            process.wait_until(ready.exists, 90.0, "ready")
        except ServerUnavailable as exc:
            raise RunFailed(f"{label} did not start: {str(exc)[-600:]}") from None
        return consumer

    def stop_consumer(self, consumer: Consumer) -> None:
        consumer.stop()
        with contextlib.suppress(ValueError):
            self.started.remove(consumer)

    def run_tool(self, argv: Sequence[str], timeout: float) -> str:
        """Run a short-lived helper process to completion; its stdout, or RunFailed."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        try:
            done = subprocess.run(
                list(argv),
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RunFailed(f"{argv[2]} did not finish within {timeout:.0f}s") from None
        if done.returncode != 0:
            raise RunFailed(
                f"{' '.join(argv[2:4])} exited {done.returncode}: {done.stderr.strip()[-600:]}"
            )
        return done.stdout

    # -- backlog -------------------------------------------------------------------------

    def fill(self, items: Sequence[bytes] | Iterator[bytes], db: int = BACKLOG_DB) -> int:
        """Push ``items`` (oldest first) onto the queue list of ``db``; returns how many."""
        client, count, chunk = self.client(db), 0, []
        for item in items:
            chunk.append(item)
            if len(chunk) == 2000:
                count += self._push(client, chunk)
                chunk = []
        return count + (self._push(client, chunk) if chunk else 0)

    @staticmethod
    def _push(client: redis.Redis, chunk: list[bytes]) -> int:
        client.lpush(QUEUE, *chunk)
        return len(chunk)

    def warm_up(
        self,
        consumer: Consumer | None,
        results: bool,
        count: int = 300,
        items: Sequence[bytes] | None = None,
    ) -> None:
        """Run ``count`` no-op tasks (or ``items``, a peer's own messages) through a ready
        consumer and wait for them, then forget their results: first-use costs (lazy imports,
        first script loads, cold caches) stay out of the timed run, for every side alike."""
        client = self.client()
        if items is None:
            items = [envelope("bench.noop", [-i]) for i in range(count)]
        count = len(items)
        client.lpush(QUEUE, *items)
        deadline = time.monotonic() + 60.0
        while self.remaining(count, results) != (0, 0, 0):
            if time.monotonic() > deadline:
                raise RunFailed(f"the warm-up ({count} tasks) did not finish within 60 s")
            if consumer is not None and not consumer.process.alive():
                raise RunFailed(f"{consumer.label} exited during the warm-up")
            time.sleep(0.01)
        self.client(RESULTS_DB).flushdb()

    def release(self) -> float:
        """Hand the prepared backlog to the consumers (one atomic MOVE); returns the time."""
        started = time.perf_counter()
        if not self.client(BACKLOG_DB).move(QUEUE, BROKER_DB):
            raise RunFailed("the backlog could not be moved to the broker db")
        return started

    # -- measuring -----------------------------------------------------------------------

    def remaining(self, count: int, results: bool) -> tuple[int, int, int]:
        """(ready, in flight, results still missing) right now."""
        client = self.client()
        # a member is "<len(base)>:<base list key><staging list key>"
        members = [m.decode() for m in client.zrange(STAGINGS, 0, -1)]
        staging = [m[m.index(":") + 1 + int(m[: m.index(":")]) :] for m in members]
        pipe = client.pipeline(transaction=False)
        for key in (*READY_KEYS, *staging):
            pipe.llen(key)
        pipe.hlen("unacked")
        replies = pipe.execute()
        missing = count - int(self.client(RESULTS_DB).dbsize()) if results else 0
        return sum(replies[:-1]), int(replies[-1]), max(missing, 0)

    def drain(
        self,
        count: int,
        *,
        results: bool,
        timeout: float,
        consumer: Consumer | None = None,
        on_sample: Any = None,
    ) -> float:
        """Release the backlog and wait until all ``count`` messages were processed; returns
        the seconds it took. ``on_sample(elapsed, processed)`` is called at every poll."""
        started = self.release()
        deadline = started + timeout
        left = (count, 0, 0)
        while time.perf_counter() < deadline:
            left = self.remaining(count, results)
            elapsed = time.perf_counter() - started
            if on_sample is not None:
                on_sample(elapsed, count - left[0] - left[1])
            if left == (0, 0, 0):
                return elapsed
            if consumer is not None and not consumer.process.alive():
                raise RunFailed(f"{consumer.label} exited during the drain")
            time.sleep(0.004)
        raise RunFailed(
            f"did not drain {count} in {timeout:.0f}s: ready={left[0]} in-flight={left[1]} "
            f"results missing={left[2]}"
        )


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def celery_argv(pool: str, concurrency: int | None) -> list[str]:
    argv = python_argv("celery", "-A", "benchmarks.celery_peer", "worker", "-P", pool)
    if concurrency is not None:
        argv += ["-c", str(concurrency)]
    # no broadcast start-up handshake (mingle) nor gossip/heartbeat events: nothing to talk to
    return [*argv, "-Q", QUEUE, "-l", "WARNING", "--without-mingle", "--without-gossip",
            "--without-heartbeat"]  # fmt: skip


def load_average() -> float:
    return os.getloadavg()[0]
