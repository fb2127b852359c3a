"""The scenarios: each is a list of sides (ours first, then the peers) run interleaved.

A side's ``run(bench, size)`` performs one measured run and returns a dict whose ``value`` is
the scenario's headline figure (tasks/s, msg/s, latency in ms or RSS in MiB) plus details.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from benchmarks.harness import (
    BROKER_DB,
    QUEUE,
    RESULTS_DB,
    Bench,
    Consumer,
    RunFailed,
    celery_argv,
    envelope,
    python_argv,
)

Run = Callable[[Bench, "Size"], dict[str, Any]]


@dataclass(frozen=True)
class Size:
    """How big the runs are (``--quick`` or full)."""

    drain: int  # messages per no-op drain
    io: int  # messages per I/O-bound drain
    enqueue: int  # messages per enqueue run
    latency_s: float  # seconds of paced sending
    serve: int  # messages per drain inside Serve
    memory: int  # backlog of the memory scenario
    memory_peer_s: float  # how long a (slow) peer's memory is sampled during that backlog
    repeats: int


FULL = Size(20_000, 20_000, 20_000, 20.0, 10_000, 100_000, 30.0, 3)
QUICK = Size(2_000, 2_000, 2_000, 3.0, 1_000, 10_000, 4.0, 1)


@dataclass(frozen=True)
class Target:
    """A speed to reach. ``kind``: ``ratio`` (ours / peer ``key`` >= ``bound``), ``ref``
    (ours / the reference figure ``float(key)`` >= ``bound``) or ``max`` (ours' field ``key``,
    worst run, < ``bound``)."""

    kind: str
    key: str
    bound: float
    text: str


@dataclass
class Side:
    label: str
    run: Run
    ours: bool = False
    quick: bool = True  # run in --quick mode too


@dataclass
class Scenario:
    name: str
    title: str
    unit: str
    higher_is_better: bool
    sides: list[Side]
    targets: list[Target] = field(default_factory=list)
    note: str = ""


@lru_cache(maxsize=4)
def backlog(name: str, count: int) -> tuple[bytes, ...]:
    """``count`` messages for task ``name`` (built once, pushed for every run)."""
    return tuple(envelope(name, [i]) for i in range(count))


def timeout_for(count: int, slowest_rate: float = 100.0) -> float:
    return 30.0 + count / slowest_rate


# -- drains ----------------------------------------------------------------------------------


def drain_side(
    label: str,
    argv: list[str],
    task: str,
    results: bool,
    count_of: str,
    items: Callable[[str, int], Sequence[bytes]] = lambda task, n: backlog(task, n),
) -> Run:
    """One drain of ``count_of`` messages; ``items(task, n)`` builds them (and the warm-up's
    no-ops): Celery's format unless the peer speaks its own."""

    def run(bench: Bench, size: Size) -> dict[str, Any]:
        count = getattr(size, count_of)
        bench.flush()
        bench.fill(items(task, count))
        consumer = bench.start_consumer(label, argv)
        try:
            bench.warm_up(consumer, results, items=list(items("bench.noop", 300)))
            cpu = consumer.cpu_s()
            elapsed = bench.drain(
                count, results=results, timeout=timeout_for(count), consumer=consumer
            )
            cpu = consumer.cpu_s() - cpu
        finally:
            bench.stop_consumer(consumer)
        return {"value": count / elapsed, "elapsed_s": elapsed, "count": count,
                "cpu_s": cpu, "cpu_us_per_task": cpu / count * 1e6}  # fmt: skip

    return run


def ours_argv(url: str, results: str = "", concurrency: int = 100, loop: str = "") -> list[str]:
    """Our consumer process; its event loop is uvloop when installed (as in a Ray Serve
    replica, where Ray installs it), unless ``loop`` (or ``$BENCH_LOOP``) says otherwise."""
    argv = python_argv("benchmarks.ours_worker", "--broker", url, "--ready-file", "{ready}")
    argv += ["--latency-file", "{latency}", "--concurrency", str(concurrency)]
    argv += ["--loop", loop or os.environ.get("BENCH_LOOP", "auto")]
    return [*argv, "--results", results] if results else argv


def taskiq_side(bench: Bench, task: str, results: bool, count_of: str, max_async: int) -> Side:
    """taskiq with taskiq-redis's list broker, ``max_async`` tasks at a time: the async peer."""
    label = f"taskiq (async) c{max_async}"
    res = bench.url(RESULTS_DB) if results else ""

    def items(task: str, n: int) -> list[bytes]:
        try:
            from benchmarks.taskiq_peer import messages
        except ImportError as exc:
            raise RunFailed(f"taskiq is not installed ({exc})") from None
        return messages(task, n)

    worker = python_argv("taskiq", "worker", "benchmarks.taskiq_peer:broker", "--workers", "1",
                         "--max-async-tasks", str(max_async), "--no-configure-logging")  # fmt: skip
    argv = ["env", f"BENCH_BROKER={bench.url(BROKER_DB)}", f"BENCH_RESULTS={res}", *worker]
    return Side(label, drain_side(label, argv, task, results, count_of, items))


def noop_scenario(bench: Bench, results: bool) -> Scenario:
    broker, res = bench.url(BROKER_DB), bench.url(RESULTS_DB) if results else ""
    env = {"BENCH_BROKER": broker, "BENCH_RESULTS": res}
    name = "noop_results" if results else "noop"

    def celery(pool: str, c: int | None, quick: bool) -> Side:
        label = f"celery {pool}" + (f" c{c}" if c else "")
        argv = ["env", *(f"{k}={v}" for k, v in env.items()), *celery_argv(pool, c)]
        return Side(label, drain_side(label, argv, "bench.noop", results, "drain"), quick=quick)

    return Scenario(
        name,
        f"no-op drain, {'with' if results else 'without'} Redis results, one consumer process",
        "tasks/s",
        True,
        [
            Side(
                "serve_queue",
                drain_side("serve_queue", ours_argv(broker, res), "bench.noop", results, "drain"),
                ours=True,
            ),
            Side(
                "serve_queue (stdlib asyncio loop)",
                drain_side(
                    "serve_queue (stdlib asyncio loop)",
                    ours_argv(broker, res, loop="asyncio"),
                    "bench.noop",
                    results,
                    "drain",
                ),
                ours=True,
                quick=False,
            ),
            celery("threads", 10, True),
            celery("solo", None, False),
            celery("prefork", 2, False),
            taskiq_side(bench, "bench.noop", results, "drain", 100),
        ],
        [Target("ratio", "celery threads c10", 10.0, ">= 10x celery threads c10")],
    )


def io_scenario(bench: Bench) -> Scenario:
    broker = bench.url(BROKER_DB)
    env = ["env", f"BENCH_BROKER={broker}", "BENCH_RESULTS="]
    celery = [*env, *celery_argv("threads", 100)]
    ours = ours_argv(broker, concurrency=1000)
    return Scenario(
        "io",
        "I/O-bound drain: 50 ms sleep per task (ours: asyncio.sleep, concurrency 1000; "
        "Celery: time.sleep, threads c100), no results",
        "tasks/s",
        True,
        [
            Side(
                "serve_queue",
                drain_side("serve_queue", ours, "bench.sleep", False, "io"),
                ours=True,
            ),
            Side(
                "celery threads c100",
                drain_side("celery threads c100", celery, "bench.sleep", False, "io"),
            ),
            taskiq_side(bench, "bench.sleep", False, "io", 1000),
        ],
        [
            Target("ratio", "celery threads c100", 10.0, ">= 10x celery threads c100"),
            Target("ratio", "taskiq (async) c1000", 4.0, ">= 4x the async peer (taskiq)"),
        ],
    )


# -- enqueue ---------------------------------------------------------------------------------


def enqueue_side(
    label: str,
    kind: str,
    producers: int,
    broker: Callable[[Bench], str] | None = None,
    queued_now: Callable[[Bench], int] | None = None,
) -> Run:
    """One enqueue run; ``broker`` (the URL to send to, a freshly emptied ``celery`` queue
    behind it) and ``queued_now`` (how many messages it holds) default to the session's
    Redis."""

    def run(bench: Bench, size: Size) -> dict[str, Any]:
        if broker is None:
            bench.flush()
        url = bench.url(BROKER_DB) if broker is None else broker(bench)
        argv = python_argv(
            "benchmarks.enqueue",
            kind,
            "--broker",
            url,
            "--count",
            str(size.enqueue),
            "--producers",
            str(producers),
        )
        out = bench.run_tool(argv, timeout=timeout_for(size.enqueue, 50))
        stats = json.loads(out.strip().splitlines()[-1])
        queued = int(bench.client().llen(QUEUE)) if queued_now is None else queued_now(bench)
        if queued != size.enqueue:
            raise RunFailed(f"{label}: {queued} messages on the queue, expected {size.enqueue}")
        return {"value": size.enqueue / stats["elapsed_s"], **stats}

    return run


def enqueue_scenario(bench: Bench) -> Scenario:
    return Scenario(
        "enqueue",
        "enqueue rate from one process (ours: await send_task from 100 concurrent coroutines; "
        "Celery: send_task in a loop)",
        "msg/s",
        True,
        [
            Side("serve_queue", enqueue_side("serve_queue", "ours", 100), ours=True),
            Side("celery send_task", enqueue_side("celery send_task", "celery", 1)),
        ],
        [Target("ratio", "celery send_task", 10.0, ">= 10x celery send_task")],
    )


# -- latency ---------------------------------------------------------------------------------


def latency_side(label: str, argv: list[str], rate: float = 100.0) -> Run:
    def run(bench: Bench, size: Size) -> dict[str, Any]:
        bench.flush()
        count = int(size.latency_s * rate)
        consumer = bench.start_consumer(label, argv)
        try:
            bench.warm_up(consumer, False, count=50)
            client = bench.client(BROKER_DB)

            def prepare() -> Callable[[], object]:
                stamp = StampedEnvelope()
                return lambda: client.lpush(QUEUE, stamp.now())

            paced(count, rate, prepare)
            _wait_empty(bench, count)
        finally:
            bench.stop_consumer(consumer)
        return latency_stats(label, consumer, count)

    return run


def paced(count: int, rate: float, prepare: Callable[[], Callable[[], object]]) -> None:
    """Send ``count`` messages at ``rate`` per second: ``prepare()`` builds the next one
    before the pause and returns the call that stamps and sends it, so only the send is
    inside the measured latency."""
    start = time.perf_counter() + 0.2
    for i in range(count):
        send = prepare()
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        send()


def latency_stats(label: str, consumer: Consumer, count: int) -> dict[str, Any]:
    """p50/p99/max of the latencies the (stopped) consumer wrote, in ms."""
    samples = sorted(json.loads(consumer.latency_file.read_text()))
    if len(samples) != count:
        raise RunFailed(f"{label}: {len(samples)} latencies recorded, {count} sent")
    ms = [s * 1000 for s in samples]
    return {"value": _pct(ms, 50), "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99),
            "max_ms": ms[-1], "count": count, "samples_ms": ms}  # fmt: skip


class StampedEnvelope:
    """A ``bench.latency(sent)`` list item built ahead of time, ``sent`` filled in at the
    last moment: the clock starts at the push (the enqueue), not before the producer builds
    the message, which on an idle 2-core VM costs ~0.3 ms cache-cold, as much for either
    side. ``sent`` is a fixed-width number at the start of the base64 body (``[[<sent>], ...``:
    21 bytes, 7 whole base64 groups), so stamping re-encodes 28 characters in place (and
    writes the number into ``headers.argsrepr``)."""

    _PLACEHOLDER = 1111111111.111111
    _WIDTH = 17  # len("1111111111.111111"), the width of time.time() until the year 2286

    def __init__(self) -> None:
        item = envelope("bench.latency", [self._PLACEHOLDER])
        head = base64.b64encode(b"[[%.6f]," % self._PLACEHOLDER)
        self._at = item.index(b'"body": "') + len(b'"body": "')
        if item[self._at : self._at + len(head)] != head:
            raise RuntimeError("the latency envelope's body does not start with [[<sent>],")
        self._repr_at = item.index(b"%.6f" % self._PLACEHOLDER, self._at + len(head))
        self._item = bytearray(item)

    def now(self) -> bytes:
        sent = b"%.6f" % time.time()
        if len(sent) != self._WIDTH:
            raise RuntimeError(f"unexpected timestamp width: {sent!r}")
        encoded = base64.b64encode(b"[[" + sent + b"],")
        self._item[self._at : self._at + len(encoded)] = encoded
        self._item[self._repr_at : self._repr_at + self._WIDTH] = sent  # headers.argsrepr
        return bytes(self._item)


def _wait_empty(bench: Bench, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if bench.remaining(count, False)[:2] == (0, 0):
            return
        time.sleep(0.05)
    raise RunFailed("the paced messages were not all consumed within 30 s")


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def latency_scenario(bench: Bench) -> Scenario:
    broker = bench.url(BROKER_DB)
    celery = ["env", f"BENCH_BROKER={broker}", "BENCH_RESULTS=", *celery_argv("threads", 10)]
    return Scenario(
        "latency",
        "latency from enqueue (the LPUSH) to handler start at a paced 100 tasks/s, no results",
        "ms (p50)",
        False,
        [
            Side("serve_queue", latency_side("serve_queue", ours_argv(broker)), ours=True),
            Side("celery threads c10", latency_side("celery threads c10", celery)),
        ],
        [Target("max", "p50_ms", 1.0, "p50 < 1 ms"), Target("max", "p99_ms", 3.0, "p99 < 3 ms")],
    )


# -- memory ----------------------------------------------------------------------------------


def memory_side(label: str, argv: list[str], ours: bool) -> Run:
    def run(bench: Bench, size: Size) -> dict[str, Any]:
        bench.flush()
        count = size.memory
        bench.fill(envelope("bench.noop", [i]) for i in range(count))
        consumer = bench.start_consumer(label, argv)
        try:
            idle = idle_rss(consumer)
            sampler = RssSampler(consumer, timeout_for(count) if ours else size.memory_peer_s)
            drained = True
            try:
                bench.drain(count, results=False, timeout=sampler.limit, consumer=consumer,
                            on_sample=sampler if ours else sampler.bounded)  # fmt: skip
            except (Enough, RunFailed):
                if ours:
                    raise
                drained = False
        finally:
            bench.stop_consumer(consumer)
        return memory_stats(idle, sampler.samples, count, drained)

    return run


class Enough(Exception):
    """A peer was sampled long enough (it need not drain the whole backlog)."""


class RssSampler:
    """The memory scenario's samples ``(elapsed, processed, RSS)``, one per 0.1 s at most.
    ``limit``: seconds ours may take to drain; how long a peer is sampled (``bounded``)."""

    def __init__(self, consumer: Any, limit: float) -> None:
        self.consumer = consumer
        self.limit = limit
        self.samples: list[tuple[float, int, int]] = []
        self._last = 0.0

    def __call__(self, elapsed: float, done: int) -> None:
        if elapsed - self._last >= 0.1:
            self._last = elapsed
            self.samples.append((elapsed, done, self.consumer.rss()))

    def bounded(self, elapsed: float, done: int) -> None:
        """Sample, then raise ``Enough`` once the peer was sampled for ``limit`` seconds."""
        self(elapsed, done)
        if elapsed > self.limit:
            raise Enough


def idle_rss(consumer: Any, seconds: float = 2.0) -> int:
    time.sleep(0.5)
    values = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        values.append(consumer.rss())
        time.sleep(0.1)
    return int(statistics.median(values))


def memory_stats(
    idle: int, samples: list[tuple[float, int, int]], count: int, drained: bool
) -> dict[str, Any]:
    mib = 1024 * 1024
    # flatness over the backlog: from 10% processed on (the first batches warm every buffer)
    steady = [rss for _, done, rss in samples if done >= count * 0.1] or [s[2] for s in samples]
    low, high = min(steady), max(steady)
    return {"value": high / mib, "idle_mib": idle / mib, "peak_mib": high / mib,
            "steady_min_mib": low / mib, "growth_pct": (high - low) / low * 100,
            "processed": samples[-1][1] if samples else 0, "drained": drained,
            "samples": [(round(t, 2), d, round(r / mib, 2)) for t, d, r in samples]}  # fmt: skip


def memory_scenario(bench: Bench) -> Scenario:
    broker = bench.url(BROKER_DB)
    celery = ["env", f"BENCH_BROKER={broker}", "BENCH_RESULTS=", *celery_argv("threads", 10)]
    return Scenario(
        "memory",
        "RSS of one consumer: idle, then while draining a large no-op backlog (peer: sampled "
        "for a bounded time)",
        "MiB (peak)",
        False,
        [
            Side("serve_queue", memory_side("serve_queue", ours_argv(broker), True), ours=True),
            Side("celery threads c10", memory_side("celery threads c10", celery, False)),
        ],
        [Target("max", "growth_pct", 10.0, "RSS flat within 10% over the backlog")],
    )
