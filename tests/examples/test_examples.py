"""Every example runs, and the README shows them as they are (style.md habit 12).

A README code block preceded by ``<!-- example: PATH -->`` must equal the file at PATH, so the
README cannot drift from code that the suite runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_cluster import RayCluster
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- example: (?P<path>\S+) -->\n```[a-z]*\n(?P<code>.*?)```", re.DOTALL)


def run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_readme_examples_are_the_files_the_suite_runs() -> None:
    blocks = list(BLOCK.finditer(README.read_text()))
    assert len(blocks) >= 2, "the README shows no example files"
    for block in blocks:
        path = ROOT / block["path"]
        assert block["code"] == path.read_text(), f"README block differs from {block['path']}"


@pytest.mark.timeout(60)
def test_quickstart(redis_server: RedisServer) -> None:
    redis_server.flushall()
    base = redis_server.url(0).rsplit("/", 1)[0]
    done = run([sys.executable, "examples/quickstart.py"], {"REDIS_URL": base}, timeout=50)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(" 5 SUCCESS")
    assert lines[1] == "cat.small.png"
    assert lines[2] == "failed as expected: Reject ['not a PNG: cat.gif', False]"  # Celery's form


@pytest.mark.serve
@pytest.mark.timeout(300)
def test_document_indexing_demo(ray_cluster: RayCluster, tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "examples.document_indexing",
        "--ray-address", ray_cluster.address, "--http-port", str(ray_cluster.http_port),
        "--documents", "8", "--index-seconds", "0.5", "--out", str(tmp_path),
    ]  # fmt: skip
    env = {"SERVE_QUEUE_BROKER": f"sqlite:///{tmp_path}/broker.db", **RayCluster.environment}
    done = run(argv, env, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "8/8 succeeded" in done.stdout
    assert (tmp_path / "time_per_task.png").stat().st_size > 1000
