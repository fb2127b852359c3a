"""Inside Ray Serve: one replica of our consumer against one replica of Ray's own
``ray.serve.task_consumer`` (its Celery adapter), same no-op task, same Redis, same backlog.

Both store results in Redis (Ray's Celery adapter always does). Ray's consumer runs Celery's
thread pool with ``max_ongoing_requests`` threads; it is given 10, like the Celery c10 peer
(Serve's default would be 5). A local Ray cluster (``ray.init(num_cpus=4)``) is started once,
on first use, and stopped by ``close()``.
"""

from __future__ import annotations

import logging
import os
import time
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
    """The Ray cluster of the serve scenario, started on first use."""

    def __init__(self) -> None:
        self.cluster: Any = None

    def ensure_started(self) -> None:
        if self.cluster is not None:
            return
        from tests.ray_cluster import RayCluster

        os.environ.update(RayCluster.environment)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        )
        cluster = RayCluster(num_cpus=4)
        try:
            cluster.start()
        except Exception as exc:
            raise RunFailed(f"Ray did not start: {str(exc)[:400]}") from None
        self.cluster = cluster
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no per-deploy chatter

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def side(self, label: str, build: Any) -> Side:
        def run(bench: Bench, size: Size) -> dict[str, Any]:
            from ray import serve

            self.ensure_started()
            count = size.serve
            bench.flush()
            bench.fill(backlog("bench.noop", count))
            app = build(bench.url(BROKER_DB), bench.url(RESULTS_DB))
            serve.run(app, name="bench", route_prefix=None)
            try:
                _wait_blocked(bench)
                elapsed = bench.drain(count, results=True, timeout=timeout_for(count, 50))
            finally:
                serve.delete("bench")
            return {"value": count / elapsed, "elapsed_s": elapsed, "count": count}

        return Side(label, run, ours=label == "serve_queue")


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
            serve_bench.side("serve_queue", ours_app),
            serve_bench.side("ray task_consumer (celery adapter)", ray_app),
        ],
        [Target("ratio", "ray task_consumer (celery adapter)", 10.0, ">= 10x Ray's task consumer")],
        note=f"Ray's consumer: Celery threads, max_ongoing_requests={RAY_CONCURRENCY}",
    )
