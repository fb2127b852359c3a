"""Inside Ray Serve: one replica of our consumer against one replica of Ray's own
``ray.serve.task_consumer`` (its Celery adapter), same no-op task, same broker (Redis, or
RabbitMQ with ``--broker rabbitmq``), same backlog.

Both store results in Redis (Ray's Celery adapter always does). Ray's consumer runs Celery's
thread pool with ``max_ongoing_requests`` threads; it is given 10, like the Celery c10 peer
(Serve's default would be 5). A local Ray cluster (``ray.init(num_cpus=4)``) is started once,
on first use, and stopped by ``close()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks.harness import BROKER_DB, RESULTS_DB, ROOT, Bench, RunFailed
from benchmarks.scenarios import Scenario, Side, Size, Target, backlog, timeout_for
from serve_queue import TaskQueue, task

RAY_CONCURRENCY = 10


def ours_app(broker: str, results: str) -> Any:
    from ray import serve

    queue = TaskQueue(broker, results=results)

    @serve.deployment(name="ours_consumer", num_replicas=1, ray_actor_options={"num_cpus": 0})
    @queue.consumer(queues=["celery"], concurrency=100)
    class OursConsumer:
        @task("bench.noop")
        async def noop(self, i: int) -> None:
            return None

    return OursConsumer.bind()


def ray_app(broker: str, results: str) -> Any:
    from ray import serve
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
    from ray.serve.task_consumer import task_consumer, task_handler

    config = TaskProcessorConfig(
        queue_name="celery",
        adapter_config=CeleryAdapterConfig(broker_url=broker, backend_url=results),
    )

    @serve.deployment(
        name="ray_consumer",
        num_replicas=1,
        max_ongoing_requests=RAY_CONCURRENCY,
        ray_actor_options={"num_cpus": 0},
    )
    @task_consumer(task_processor_config=config)
    class RayConsumer:
        @task_handler(name="bench.noop")
        def noop(self, i: int) -> None:
            return None

    return RayConsumer.bind()


class ServeBench:
    """A Ray Serve driver in a process of its own (``python -m benchmarks.serve_bench``),
    started on first use: if Ray dies (a raylet killed from outside takes its driver down
    with it), only that run fails, and the next run starts a fresh cluster."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.log: Any = None

    def _ensure(self, bench: Bench) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
        self.log = (bench.workdir / "serve-driver.log").open("a")
        argv = [sys.executable, "-m", "benchmarks.serve_bench", bench.url(RESULTS_DB)]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)  # fmt: skip
        self._reply(180.0, "starting Ray")

    def _reply(self, timeout: float, doing: str) -> None:
        if not self._answer(timeout, doing):
            self.close()
            raise RunFailed(f"the Ray Serve driver did not answer within {timeout:.0f}s ({doing})")

    def _answer(self, timeout: float, doing: str) -> bool:
        """Whether the driver said ``@@ ok`` within ``timeout`` seconds (0: only look);
        RunFailed if it answered with an error or exited."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                return False
            line = proc.stdout.readline()
            if not line:
                raise RunFailed(f"the Ray Serve driver exited while {doing} (see its log)")
            if line.startswith("@@ ok"):
                return True
            if line.startswith("@@ error"):
                raise RunFailed(f"{doing}: {line[9:].strip()}")

    def _call(self, command: str, timeout: float) -> None:
        self._send(command)
        self._reply(timeout, command.split()[0])

    def _send(self, command: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise RunFailed(f"the Ray Serve driver is gone ({command.split()[0]})") from None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def deployed_drain(
        self, bench: Bench, app: str, broker: str, drain: Callable[[Callable[[], bool]], float]
    ) -> float:
        """Deploy ``app`` consuming ``broker`` and time ``drain(alive)`` (which starts at once,
        so a backlog the replica starts on while Serve still reports it deploying is timed
        from its warm-up on; ``alive()`` raises RunFailed as soon as the deploy failed), then
        delete the app."""
        self._ensure(bench)
        doing, deployed = f"deploy {app}", [False]
        self._send(f"{doing} {broker}")

        def alive() -> bool:
            deployed[0] = deployed[0] or self._answer(0.0, doing)
            return self.alive

        try:
            elapsed = drain(alive)
            if not deployed[0]:
                self._reply(180.0, doing)
        finally:
            self._call("delete", 120.0)
        return elapsed

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # Ray's own processes included
            proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    def side(self, label: str, app: str) -> Side:
        def run(bench: Bench, size: Size) -> dict[str, Any]:
            self._ensure(bench)
            count = size.serve
            bench.flush()
            bench.fill(backlog("bench.noop", count))
            self._call(f"deploy {app} {bench.url(BROKER_DB)}", 180.0)
            try:
                _wait_blocked(bench)
                bench.warm_up(None, True)
                elapsed = bench.drain(count, results=True, timeout=timeout_for(count, 50))
            finally:
                self._call("delete", 120.0)
            return {"value": count / elapsed, "elapsed_s": elapsed, "count": count}

        return Side(label, run, ours=app == "ours")


def _wait_blocked(bench: Bench, timeout: float = 90.0) -> None:
    """Wait until a consumer waits on the queue (a client blocked in BRPOP/BLMOVE)."""
    client = bench.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        clients = client.client_list()
        if any("b" in c.get("flags", "") for c in clients):
            return
        time.sleep(0.1)
    raise RunFailed(f"no consumer was waiting on the queue after {timeout:.0f}s")


def serve_scenario(serve_bench: ServeBench) -> Scenario:
    return Scenario(
        "serve",
        "inside Ray Serve: no-op drain by one replica, with Redis results",
        "tasks/s",
        True,
        [
            serve_bench.side("serve_queue", "ours"),
            serve_bench.side("ray task_consumer (celery adapter)", "ray"),
        ],
        [Target("ratio", "ray task_consumer (celery adapter)", 10.0, ">= 10x Ray's task consumer")],
        note=f"Ray's consumer: Celery threads, max_ongoing_requests={RAY_CONCURRENCY}",
    )


def driver(results: str) -> None:
    """The driver process: start a local Ray cluster with Serve, then follow commands on
    stdin (``deploy ours|ray <broker URL>``, ``delete``, ``quit``), answering ``@@ ok`` or
    ``@@ error``."""
    from ray import serve

    from tests.ray_cluster import RayCluster

    os.environ.update(RayCluster.environment)
    cluster = RayCluster(num_cpus=4)
    try:
        cluster.start()
    except Exception as exc:
        print(f"@@ error Ray did not start: {str(exc)[:300]!r}", flush=True)
        return
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no per-deploy chatter
    apps = {"ours": ours_app, "ray": ray_app}
    print("@@ ok", flush=True)
    try:
        for line in sys.stdin:
            command = line.split()
            try:
                if command[:1] == ["deploy"]:
                    app = apps[command[1]](command[2], results)
                    serve.run(app, name="bench", route_prefix=None)
                elif command[:1] == ["delete"]:
                    serve.delete("bench")
                else:
                    break
            except Exception as exc:
                print(f"@@ error {exc!r}"[:400], flush=True)
            else:
                print("@@ ok", flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    driver(sys.argv[1])
