"""``serve-queue`` from a shell: ``--accept`` adds serializers to JSON, never replaces it."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from serve_queue import TaskQueue
from serve_queue.cli import _parser, accept_content
from tests.servers import Process

HANDLERS = """
from serve_queue import task


class Handlers:
    @task("cli.add")
    async def add(self, x: int, y: int) -> int:
        return x + y
"""


def test_accept_adds_to_json() -> None:
    assert accept_content(None) == ("json",)
    assert accept_content(["msgpack"]) == ("json", "msgpack")
    assert accept_content(["yaml", "json", "msgpack", "yaml"]) == ("json", "yaml", "msgpack")


def test_worker_help_says_json_is_always_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["worker", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "JSON is always accepted, --accept adds to it" in text


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_worker_given_accept_msgpack_runs_json_and_msgpack_tasks(tmp_path: Path) -> None:
    (tmp_path / "cli_handlers.py").write_text(textwrap.dedent(HANDLERS))
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "serve_queue.cli", "worker", "cli_handlers:Handlers",
            "--broker", url, "--accept", "msgpack"]  # fmt: skip
    worker = Process("serve-queue worker", argv, log, cwd=tmp_path)
    try:
        worker.wait_until(lambda: "ready:" in log.read_text(errors="replace"), 60, "ready")
        queue = TaskQueue(url)
        as_json = await queue.send_task("cli.add", args=[2, 3])
        as_msgpack = await queue.send_task("cli.add", args=[4, 5], serializer="msgpack")
        assert await as_json.get(timeout=20) == 5
        assert await as_msgpack.get(timeout=20) == 9
        await queue.close()
    finally:
        worker.stop()
