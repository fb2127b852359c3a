"""Worker subprocesses for reliability tests: real processes, real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

StartWorker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[StartWorker]:
    """Factory: ``serve-queue worker tests.reliability.handlers:Handlers`` in a subprocess
    that has printed "ready"; every one still running is killed after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(broker: str, results: str, marks: str, *extra: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(procs)}.log"
        env = {**os.environ, "SQ_MARKS_URL": marks, "PYTHONPATH": str(ROOT)}
        argv = [
            sys.executable, "-m", "serve_queue.cli", "worker",
            "tests.reliability.handlers:Handlers", "--broker", broker, "--results", results,
            *extra,
        ]  # fmt: skip
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        for _ in range(300):
            if "ready:" in log.read_text(errors="replace"):
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker did not start:\n{log.read_text(errors='replace')[-3000:]}")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
