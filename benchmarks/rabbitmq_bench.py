"""The no-op drain with results on RabbitMQ (``--broker rabbitmq``): ours against Celery
threads c10, both consuming the same AMQP queue and storing results in the session's Redis.

AMQP has no atomic move, so the backlog (``count`` messages after ``WARM_UP`` more, published
with kombu, Celery's own client, as Celery's ``send_task`` would) is in the queue before the
consumer starts; completions are counted through the stored results, and the clock runs from
the moment the warm-up messages are done until every result is stored. Start-up and warm-up
are thus never timed, for either side. A private RabbitMQ node is started on first use.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.harness import RESULTS_DB, Bench, Consumer, RunFailed, celery_argv
from benchmarks.scenarios import Scenario, Side, Size, Target, ours_argv, timeout_for
from serve_queue import protocol

WARM_UP = 300


class RabbitBench:
    """The RabbitMQ node of a session, started on first use, stopped by ``close()``."""

    def __init__(self) -> None:
        self.server: Any = None

    def url(self, bench: Bench) -> str:
        if self.server is None:
            from tests.servers import RabbitMQServer, ServerUnavailable

            workdir = bench.workdir / "rabbitmq"
            workdir.mkdir(exist_ok=True)
            server = RabbitMQServer(workdir)
            try:
                server.start()
            except ServerUnavailable as exc:
                raise RunFailed(f"RabbitMQ did not start: {str(exc)[:300]}") from None
            self.server = server
        return str(self.server.url)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def side(self, label: str, argv_for: Any) -> Side:
        def run(bench: Bench, size: Size) -> dict[str, Any]:
            url = self.url(bench)
            count = size.drain
            bench.flush()
            _refill(url, count + WARM_UP)
            consumer = bench.start_consumer(label, argv_for(url, bench.url(RESULTS_DB)))
            try:
                elapsed = _timed_drain(bench, consumer, count)
            finally:
                bench.stop_consumer(consumer)
            return {"value": count / elapsed, "elapsed_s": elapsed, "count": count}

        return Side(label, run, ours=label == "serve_queue")


def _refill(url: str, total: int) -> None:
    """Empty the ``celery`` queue, then publish ``total`` no-op tasks to it."""
    from kombu import Connection, Exchange, Queue

    exchange = Exchange("celery", "direct", durable=True)
    queue = Queue("celery", exchange, routing_key="celery", durable=True)
    with Connection(url) as conn:
        channel = conn.channel()
        bound = queue(channel)
        bound.declare()
        bound.purge()
        producer = conn.Producer(channel)
        for i in range(total):
            message = protocol.encode_task("bench.noop", [i], {}, protocol.SendOptions(),
                                           origin="gen0@bench")  # fmt: skip
            props = dict(message.properties)
            producer.publish(
                message.body, exchange=exchange, routing_key="celery", serializer=None,
                content_type=message.content_type, content_encoding=message.content_encoding,
                headers=dict(message.headers), delivery_mode=2, priority=props.get("priority"),
                correlation_id=props.get("correlation_id"), reply_to=props.get("reply_to"),
            )  # fmt: skip


def _timed_drain(bench: Bench, consumer: Consumer, count: int) -> float:
    results = bench.client(RESULTS_DB)
    deadline = time.monotonic() + 90 + timeout_for(count)
    started = None
    while time.monotonic() < deadline:
        done = int(results.dbsize())
        if started is None and done >= WARM_UP:
            started, base = time.perf_counter(), done
        if done >= count + WARM_UP and started is not None:
            # tasks done before the clock started are not counted in the rate
            return (time.perf_counter() - started) * count / (count + WARM_UP - base)
        if not consumer.process.alive():
            raise RunFailed(f"{consumer.label} exited during the drain")
        time.sleep(0.004)
    raise RunFailed(f"did not drain {count} messages in time")


def rabbitmq_scenario(rabbit: RabbitBench) -> Scenario:
    def ours(url: str, results: str) -> list[str]:
        return ours_argv(url, results)

    def celery(url: str, results: str) -> list[str]:
        return ["env", f"BENCH_BROKER={url}", f"BENCH_RESULTS={results}",
                *celery_argv("threads", 10)]  # fmt: skip

    return Scenario(
        "noop_results",
        "RabbitMQ: no-op drain with Redis results, one consumer process",
        "tasks/s",
        True,
        [rabbit.side("serve_queue", ours), rabbit.side("celery threads c10", celery)],
        [Target("ratio", "celery threads c10", 10.0, ">= 10x celery threads c10")],
        note="RabbitMQ broker: only this scenario so far",
    )
