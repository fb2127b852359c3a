"""The code-quality gates run as tests, so one pytest run is the whole verdict.

ruff (lint), mypy --strict and import-linter (the layering of design.md section 3) must pass
on the package as it is; and importing serve_queue must not import any broker client.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def run_tool(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a tool from the project's venv in the repository root, capturing all output."""
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_clean(done: subprocess.CompletedProcess[str]) -> None:
    command = shlex.join([Path(done.args[0]).name, *done.args[1:]])
    assert done.returncode == 0, (
        f"`{command}` exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def test_ruff_check() -> None:
    assert_clean(run_tool("ruff", "check", "--no-cache", "."))


@pytest.mark.timeout(600)
def test_mypy_strict() -> None:
    assert_clean(run_tool("mypy", "--strict", "-p", "serve_queue"))


@pytest.mark.timeout(300)
def test_import_layers() -> None:
    assert_clean(run_tool("lint-imports", "--no-cache"))


HEAVY_CLIENTS = ("redis", "aio_pika", "aiormq", "aioboto3", "botocore", "boto3", "ray", "celery")


def test_import_serve_queue_loads_no_broker_client() -> None:
    probe = (
        "import json, sys, serve_queue\n"
        f"heavy = {list(HEAVY_CLIENTS)!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
