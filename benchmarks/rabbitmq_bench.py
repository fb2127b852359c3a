"""The scenarios on RabbitMQ (``--broker rabbitmq``): ours against Celery's peers, both sides
consuming the same AMQP queue of a private RabbitMQ node (started on first use); results, when
stored, go to the session's Redis.

AMQP has no atomic move, so a drain's backlog (``count`` messages after ``WARM_UP`` more,
published with kombu, Celery's own client, as Celery's ``send_task`` would) is in the queue
before the consumer starts, and the clock runs from the moment the warm-up messages are gone
until the last message is: with results, counted by the stored results; without, by the
queue's ready count (a passive declare every 4 ms), which counts messages taken rather than
done, at both ends of the timed span alike, so a consumer's prefetch window is in flight at
the start as at the end. Start-up and warm-up are thus never timed, for either side.

The memory scenario measures a consumer's idle RSS on the empty queue, stops it, publishes
the backlog, and samples a fresh consumer of the same command while it drains that backlog
(again counted by the ready count).

Inside Ray Serve (``serve``), the backlog is published first and the replica deployed on it;
the clock starts when the warm-up's results are stored, whether or not Serve has reported the
deployment done by then.

Scenarios: ``noop``, ``noop_results``, ``io``, ``enqueue``, ``latency``, ``serve``, ``memory``,
the same seven as on Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.harness import RESULTS_DB, Bench, Consumer, RunFailed, celery_argv, python_argv
from benchmarks.scenarios import (
    Enough,
    RssSampler,
    Scenario,
    Side,
    Size,
    Target,
    enqueue_side,
    idle_rss,
    latency_stats,
    memory_stats,
    ours_argv,
    paced,
    timeout_for,
)
from benchmarks.serve_bench import RAY_CONCURRENCY, ServeBench
from serve_queue import protocol
from serve_queue.types import OutgoingMessage

WARM_UP = 300
QUEUE = "celery"
SCENARIOS = ("noop", "noop_results", "io", "enqueue", "latency", "serve", "memory")
#: publishes between two round trips while filling (keeps kombu's writes under the broker's
#: flow control: py-amqp gives up on a socket write blocked for a second)
SYNC_EVERY = 2_000
ArgvFor = Callable[[str, str], list[str]]  # (broker URL, results URL or "") -> argv


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

    def drain_side(
        self, label: str, argv_for: ArgvFor, task: str, results: bool, count_of: str
    ) -> Side:
        def run(bench: Bench, size: Size) -> dict[str, Any]:
            url = self.url(bench)
            count = getattr(size, count_of)
            bench.flush()
            with _channel(url) as channel:
                _refill(channel, task, count + WARM_UP)
                res = bench.url(RESULTS_DB) if results else ""
                consumer = bench.start_consumer(label, argv_for(url, res))

                def done() -> int:  # stored results, or messages gone from the queue
                    if results:
                        return int(bench.client(RESULTS_DB).dbsize())
                    return count + WARM_UP - _ready(channel)

                try:
                    elapsed = _timed_drain(label, consumer.process.alive, count, done)
                finally:
                    bench.stop_consumer(consumer)
            return {"value": count / elapsed, "elapsed_s": elapsed, "count": count}

        return Side(label, run, ours=label == "serve_queue", quick=label != "celery solo")

    def latency_side(self, label: str, argv_for: ArgvFor, rate: float = 100.0) -> Side:
        def run(bench: Bench, size: Size) -> dict[str, Any]:
            url = self.url(bench)
            count = int(size.latency_s * rate)
            with _channel(url) as channel:
                _declare(channel).purge()
                consumer = bench.start_consumer(label, argv_for(url, ""))
                try:
                    _refill(channel, "bench.noop", 50, purge=False)  # warm-up
                    _wait_ready(channel, 0, consumer)
                    paced(count, rate, lambda: _stamped_send(channel))
                    _wait_ready(channel, 0, consumer)
                    time.sleep(0.2)  # the last deliveries taken are handled by now
                finally:
                    bench.stop_consumer(consumer)
            return latency_stats(label, consumer, count)

        return Side(label, run, ours=label == "serve_queue")

    def memory_side(self, label: str, argv_for: ArgvFor) -> Side:
        ours = label == "serve_queue"

        def run(bench: Bench, size: Size) -> dict[str, Any]:
            url, count = self.url(bench), size.memory
            with _channel(url) as channel:
                _declare(channel).purge()
                consumer = bench.start_consumer(label, argv_for(url, ""))
                try:
                    idle = idle_rss(consumer)
                finally:
                    bench.stop_consumer(consumer)
                _refill(channel, "bench.noop", count)
                consumer = bench.start_consumer(label, argv_for(url, ""))
                sampler = RssSampler(consumer, timeout_for(count) if ours else size.memory_peer_s)
                sample = sampler if ours else sampler.bounded
                started, drained = time.perf_counter(), True
                try:
                    while (done := count - _ready(channel)) < count:
                        elapsed = time.perf_counter() - started
                        sample(elapsed, done)
                        if elapsed > sampler.limit:
                            raise RunFailed(f"did not drain {count} in {sampler.limit:.0f}s")
                        if not consumer.process.alive():
                            raise RunFailed(f"{label} exited during the drain")
                        time.sleep(0.1)
                except Enough:
                    drained = False
                finally:
                    bench.stop_consumer(consumer)
            return memory_stats(idle, sampler.samples, count, drained)

        return Side(label, run, ours=ours)

    def serve_side(self, serve_bench: ServeBench, label: str, app: str) -> Side:
        def run(bench: Bench, size: Size) -> dict[str, Any]:
            url, count = self.url(bench), size.serve
            bench.flush()
            results = bench.client(RESULTS_DB)
            with _channel(url) as channel:
                _refill(channel, "bench.noop", count + WARM_UP)

            def drain(alive: Callable[[], bool]) -> float:
                return _timed_drain(label, alive, count, lambda: int(results.dbsize()))

            elapsed = serve_bench.deployed_drain(bench, app, url, drain)
            return {"value": count / elapsed, "elapsed_s": elapsed, "count": count}

        return Side(label, run, ours=app == "ours")

    def enqueue_side(self, label: str, kind: str, producers: int) -> Side:
        def broker(bench: Bench) -> str:
            url = self.url(bench)
            with _channel(url) as channel:
                _declare(channel).purge()
            return url

        def queued_now(bench: Bench) -> int:
            with _channel(self.url(bench)) as channel:
                return _ready(channel)

        run = enqueue_side(label, kind, producers, broker, queued_now)
        return Side(label, run, ours=kind == "ours")


def _ours(concurrency: int = 100) -> ArgvFor:
    return lambda url, results: ours_argv(url, results, concurrency=concurrency)


def _floor(url: str, results: str) -> list[str]:
    return python_argv("benchmarks.amqp_floor", "--broker", url, "--ready-file", "{ready}")


#: the sides that show the broker's own limit (a bare client: see benchmarks/amqp_floor.py)
FLOOR = "raw AMQP client (broker ceiling)"


def _celery(pool: str, c: int | None) -> ArgvFor:
    return lambda url, results: ["env", f"BENCH_BROKER={url}", f"BENCH_RESULTS={results}",
                                 *celery_argv(pool, c)]  # fmt: skip


def rabbitmq_scenarios(
    rabbit: RabbitBench, serve_bench: ServeBench, names: list[str]
) -> list[Scenario]:
    """The scenarios of ``names`` that run on RabbitMQ, in that order."""
    makers = {
        "noop": lambda: _noop(rabbit, results=False),
        "noop_results": lambda: _noop(rabbit, results=True),
        "io": lambda: _io(rabbit),
        "enqueue": lambda: _enqueue(rabbit),
        "latency": lambda: _latency(rabbit),
        "serve": lambda: _serve(rabbit, serve_bench),
        "memory": lambda: _memory(rabbit),
    }
    return [makers[name]() for name in names if name in makers]


def _noop(rabbit: RabbitBench, results: bool) -> Scenario:
    def side(label: str, argv_for: ArgvFor) -> Side:
        return rabbit.drain_side(label, argv_for, "bench.noop", results, "drain")

    return Scenario(
        "noop_results" if results else "noop",
        f"RabbitMQ: no-op drain, {'with Redis' if results else 'without'} results, "
        "one consumer process",
        "tasks/s",
        True,
        [
            side("serve_queue", _ours()),
            side("celery threads c10", _celery("threads", 10)),
            side("celery solo", _celery("solo", None)),
            *([] if results else [side(FLOOR, _floor)]),
        ],
        [Target("ratio", "celery threads c10", 10.0, ">= 10x celery threads c10")],
    )


def _io(rabbit: RabbitBench) -> Scenario:
    def side(label: str, argv_for: ArgvFor) -> Side:
        return rabbit.drain_side(label, argv_for, "bench.sleep", False, "io")

    return Scenario(
        "io",
        "RabbitMQ: I/O-bound drain, 50 ms sleep per task (ours: asyncio.sleep, concurrency "
        "1000; Celery: time.sleep, threads c100), no results",
        "tasks/s",
        True,
        [side("serve_queue", _ours(1000)), side("celery threads c100", _celery("threads", 100))],
        [Target("ratio", "celery threads c100", 10.0, ">= 10x celery threads c100")],
    )


def _enqueue(rabbit: RabbitBench) -> Scenario:
    return Scenario(
        "enqueue",
        "RabbitMQ: enqueue rate from one process (ours: await send_task from 100 coroutines, "
        "publisher confirms on; Celery: send_task in a loop, no confirms)",
        "msg/s",
        True,
        [
            rabbit.enqueue_side("serve_queue", "ours", 100),
            rabbit.enqueue_side("celery send_task", "celery", 1),
            rabbit.enqueue_side(FLOOR, "raw", 1),
        ],
        [Target("ratio", "celery send_task", 10.0, ">= 10x celery send_task")],
    )


def _latency(rabbit: RabbitBench) -> Scenario:
    return Scenario(
        "latency",
        "RabbitMQ: latency from enqueue (kombu's publish) to handler start, paced 100/s",
        "ms (p50)",
        False,
        [
            rabbit.latency_side("serve_queue", _ours()),
            rabbit.latency_side("celery threads c10", _celery("threads", 10)),
        ],
        [Target("max", "p50_ms", 1.0, "p50 < 1 ms"), Target("max", "p99_ms", 3.0, "p99 < 3 ms")],
    )


def _serve(rabbit: RabbitBench, serve_bench: ServeBench) -> Scenario:
    ray = "ray task_consumer (celery adapter)"
    return Scenario(
        "serve",
        "RabbitMQ: inside Ray Serve, no-op drain by one replica, with Redis results",
        "tasks/s",
        True,
        [
            rabbit.serve_side(serve_bench, "serve_queue", "ours"),
            rabbit.serve_side(serve_bench, ray, "ray"),
        ],
        [Target("ratio", ray, 10.0, ">= 10x Ray's task consumer")],
        note=f"Ray's consumer: Celery threads, max_ongoing_requests={RAY_CONCURRENCY}",
    )


def _memory(rabbit: RabbitBench) -> Scenario:
    return Scenario(
        "memory",
        "RabbitMQ: RSS of one consumer: idle on the empty queue, then while draining a large "
        "no-op backlog (peer: sampled for a bounded time)",
        "MiB (peak)",
        False,
        [
            rabbit.memory_side("serve_queue", _ours()),
            rabbit.memory_side("celery threads c10", _celery("threads", 10)),
        ],
        [Target("max", "growth_pct", 10.0, "RSS flat within 10% over the backlog")],
    )


# -- AMQP plumbing (kombu, as a Celery producer) -------------------------------------------------


@contextmanager
def _channel(url: str) -> Iterator[Any]:
    from kombu import Connection

    with Connection(url) as conn:
        yield conn.channel()


def _declare(channel: Any) -> Any:
    from kombu import Exchange, Queue

    exchange = Exchange(QUEUE, "direct", durable=True)
    bound = Queue(QUEUE, exchange, routing_key=QUEUE, durable=True)(channel)
    bound.declare()
    return bound


def _ready(channel: Any) -> int:
    """Messages ready in the queue (not counting those delivered and not yet acked)."""
    return int(channel.queue_declare(queue=QUEUE, passive=True).message_count)


def _publish(channel: Any, message: OutgoingMessage) -> None:
    from kombu import Producer

    props = message.properties
    Producer(channel).publish(
        message.body, exchange=QUEUE, routing_key=QUEUE, serializer=None,
        content_type=message.content_type, content_encoding=message.content_encoding,
        headers=dict(message.headers), delivery_mode=2, priority=props.get("priority"),
        correlation_id=props.get("correlation_id"), reply_to=props.get("reply_to"),
    )  # fmt: skip


def _task(name: str, args: list[Any]) -> OutgoingMessage:
    return protocol.encode_task(name, args, {}, protocol.SendOptions(), origin="gen0@bench")


def _refill(channel: Any, task: str, total: int, *, purge: bool = True) -> None:
    """Empty the ``celery`` queue (unless ``purge`` is false), then publish ``total`` tasks."""
    bound = _declare(channel)
    if purge:
        bound.purge()
    for i in range(total):
        _publish(channel, _task(task, [i]))
        if i % SYNC_EVERY == SYNC_EVERY - 1:
            _ready(channel)


def _stamped_send(channel: Any) -> Callable[[], None]:
    """A ``bench.latency(sent)`` message built now; the call returned stamps and sends it.
    ``sent`` is spliced into the JSON body (``[[<sent>], ...``, fixed width) and argsrepr."""
    placeholder = b"%.6f" % 1111111111.111111
    message = _task("bench.latency", [1111111111.111111])
    if not message.body.startswith(b"[[" + placeholder + b"]"):
        raise RuntimeError("the latency message's body does not start with [[<sent>]")
    rest = message.body[2 + len(placeholder) :]

    def send() -> None:
        sent = b"%.6f" % time.time()
        if len(sent) != len(placeholder):
            raise RuntimeError(f"unexpected timestamp width: {sent!r}")
        headers = {**message.headers, "argsrepr": f"[{sent.decode()}]"}
        _publish(channel, OutgoingMessage(b"[[" + sent + rest, message.content_type,
                                          message.content_encoding, headers,
                                          message.properties))  # fmt: skip

    return send


def _wait_ready(channel: Any, at_most: int, consumer: Consumer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _ready(channel) > at_most:
        if time.monotonic() > deadline:
            raise RunFailed(f"{consumer.label}: the queue did not empty within {timeout:.0f} s")
        if not consumer.process.alive():
            raise RunFailed(f"{consumer.label} exited")
        time.sleep(0.01)


def _timed_drain(
    label: str, alive: Callable[[], bool], count: int, done: Callable[[], int]
) -> float:
    """Seconds per ``count`` messages, timed from when ``WARM_UP`` were done to the last;
    ``alive()`` says whether the consumer still runs."""
    deadline = time.monotonic() + 90 + timeout_for(count)
    started = None
    while time.monotonic() < deadline:
        now = done()
        if started is None and now >= WARM_UP:
            started, base = time.perf_counter(), now
        if now >= count + WARM_UP and started is not None:
            # tasks done before the clock started are not counted in the rate
            return (time.perf_counter() - started) * count / (count + WARM_UP - base)
        if not alive():
            raise RunFailed(f"{label} exited during the drain")
        time.sleep(0.004)
    raise RunFailed(f"did not drain {count} messages in time")
