"""One serve_queue consumer process for the benchmarks (what ``serve-queue worker`` runs).

    python -m benchmarks.ours_worker --broker URL [--results URL] [--concurrency N]
        [--threads N] [--sync] --ready-file PATH [--latency-file PATH]

Creates ``--ready-file`` once the consumer is started, runs until SIGTERM/SIGINT, then stops
(drains) and writes the latencies recorded by ``bench.latency`` to ``--latency-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

from benchmarks.handlers import BenchHandlers, SyncBenchHandlers
from serve_queue import TaskQueue


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


async def serve(args: argparse.Namespace) -> None:
    queue = TaskQueue(args.broker, results=args.results or "none")
    handlers = SyncBenchHandlers() if args.sync else BenchHandlers()
    worker = queue.worker(
        handlers, queues=["celery"], concurrency=args.concurrency, threads=args.threads
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    _write(args.ready_file, "ready")
    await stop.wait()
    await worker.stop(drain_timeout=5)
    if args.latency_file and isinstance(handlers, BenchHandlers):
        _write(args.latency_file, json.dumps(handlers.latencies))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--results", default="")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--sync", action="store_true", help="plain def handlers (thread pool)")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--latency-file", default="")
    parser.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="event loop: auto = uvloop when installed, as in a Ray Serve replica",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                raise
        else:
            uvloop.install()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
