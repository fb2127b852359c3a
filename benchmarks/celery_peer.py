"""The Celery 5.7 peer: ``celery -A benchmarks.celery_peer worker -P threads -c 10``.

Configured from the environment: ``BENCH_BROKER`` (broker URL), ``BENCH_RESULTS`` (result
backend URL; empty: results off, ``task_ignore_result``), ``BENCH_READY_FILE`` (created when
the worker is ready), ``BENCH_LATENCY_FILE`` (latencies of ``bench.latency`` written there as
JSON at shutdown). Everything else is Celery's default (prefetch multiplier 4, early acks).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

SLEEP_S = 0.05
_results = os.environ.get("BENCH_RESULTS") or None
app = Celery(
    "bench", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"), backend=_results
)
app.conf.update(
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    task_ignore_result=_results is None,
    enable_utc=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
_latencies: list[float] = []


@app.task(name="bench.noop")
def noop(i: int) -> None:
    return None


@app.task(name="bench.sleep")
def sleep(i: int) -> None:
    time.sleep(SLEEP_S)


@app.task(name="bench.latency")
def latency(sent: float) -> None:
    _latencies.append(time.time() - sent)


@worker_ready.connect
def _ready(**_: Any) -> None:
    path = os.environ.get("BENCH_READY_FILE")
    if path:
        Path(path).write_text(str(os.getpid()))


@worker_shutdown.connect
def _dump(**_: Any) -> None:
    path = os.environ.get("BENCH_LATENCY_FILE")
    if path:
        Path(path).write_text(json.dumps(_latencies))
