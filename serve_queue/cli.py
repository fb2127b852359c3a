"""``serve-queue``: run a worker, send a task, or look at a queue from a shell.

    serve-queue worker mymodule:Handlers --broker redis://... --results redis://... --queue celery
    serve-queue send tasks.add --args '[2, 3]' --broker redis://... --wait 10
    serve-queue depth --broker redis://... --queue celery

``worker`` runs until SIGTERM or SIGINT, then drains (``--drain-timeout``). ``--broker``
defaults to ``$SERVE_QUEUE_BROKER``, then the embedded SQLite broker. JSON is always accepted;
each ``--accept`` adds a serializer to it (``--accept msgpack`` takes JSON and msgpack).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from serve_queue.errors import ConfigurationError, ServeQueueError
from serve_queue.taskqueue import TaskQueue

__all__ = ["main"]


def load_handlers(spec: str) -> Any:
    """``module`` or ``module:attribute``; a class is instantiated with no arguments."""
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    for part in filter(None, attr.split(".")):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}") from None
    return target() if isinstance(target, type) else target


def _queue(args: argparse.Namespace) -> TaskQueue:
    options = {}
    if getattr(args, "visibility_timeout", None) is not None:
        options["visibility_timeout"] = args.visibility_timeout
    return TaskQueue(
        args.broker, results=args.results, default_queue=args.queue[0], broker_options=options
    )


def accept_content(extra: Sequence[str] | None) -> tuple[str, ...]:
    """What a worker accepts: JSON, the baseline, plus every serializer ``--accept`` named."""
    return tuple(dict.fromkeys(["json", *(extra or ())]))


async def _run_worker(args: argparse.Namespace) -> int:
    handlers = load_handlers(args.handlers)
    worker = _queue(args).worker(
        handlers,
        queues=args.queue,
        concurrency=args.concurrency,
        threads=args.threads,
        drain_timeout=args.drain_timeout,
        acks=args.acks,
        accept_content=accept_content(args.accept),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    print(
        f"serve-queue worker {worker.hostname} ready: {', '.join(worker.registry.names())}",
        flush=True,
    )
    await stop.wait()
    await worker.stop()
    return 0


async def _send(args: argparse.Namespace) -> int:
    queue = _queue(args)
    result = await queue.send_task(
        args.name, json.loads(args.args), json.loads(args.kwargs), queue=args.queue[0]
    )
    print(result.id, flush=True)
    if args.wait is not None:
        print(json.dumps(await result.get(timeout=args.wait), default=str))
    await queue.close()
    return 0


async def _depth(args: argparse.Namespace) -> int:
    queue = _queue(args)
    for name in args.queue:
        d = await queue.depth(name)
        print(f"{name}: ready={d.ready} reserved={d.reserved} delayed={d.delayed}")
    await queue.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve-queue", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", default=os.environ.get("SERVE_QUEUE_BROKER"))
    common.add_argument("--results", default=os.environ.get("SERVE_QUEUE_RESULTS"))
    common.add_argument("--queue", "-Q", action="append", help="queue name (repeatable)")
    common.add_argument("--loglevel", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", parents=[common], help="run a consumer until SIGTERM")
    worker.add_argument("handlers", help="module or module:attribute holding @task handlers")
    worker.add_argument("--concurrency", "-c", type=int, default=100)
    worker.add_argument("--threads", type=int, default=8)
    worker.add_argument("--drain-timeout", type=float, default=30.0)
    worker.add_argument("--acks", choices=["late", "early"], default="late")
    worker.add_argument(
        "--visibility-timeout", type=float, default=None, help="lease in seconds (broker default)"
    )
    worker.add_argument(
        "--accept",
        action="append",
        default=None,
        metavar="SERIALIZER",
        help="also accept this serializer or content type (repeatable), e.g. msgpack, yaml, "
        "pickle; JSON is always accepted, --accept adds to it",
    )
    send = sub.add_parser("send", parents=[common], help="enqueue one task")
    send.add_argument("name")
    send.add_argument("--args", default="[]", help="JSON list")
    send.add_argument("--kwargs", default="{}", help="JSON object")
    send.add_argument("--wait", type=float, default=None, help="wait this long for the result")
    sub.add_parser("depth", parents=[common], help="show ready/reserved/delayed counts")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.queue = args.queue or ["celery"]
    logging.basicConfig(
        level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = {"worker": _run_worker, "send": _send, "depth": _depth}[args.command]
    try:
        return asyncio.run(command(args))
    except ServeQueueError as exc:
        print(f"serve-queue: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
