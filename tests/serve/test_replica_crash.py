"""A replica process SIGKILLed mid-task: Serve replaces it and the tasks it held come back
when their lease runs out, to finish on the replacement. Nothing is lost, nothing that
finished runs again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from serve_queue import TaskQueue
from tests.serve import apps
from tests.serve.conftest import ServeApps, eventually
from tests.servers import RedisServer

pytestmark = pytest.mark.serve

LEASE_S = 3.0


@pytest.mark.timeout(240)
async def test_sigkill_of_a_replica_mid_task_redelivers_what_it_held(
    redis_server: RedisServer, redis_url: str, tmp_path: Path, serve_apps: ServeApps
) -> None:
    queue = TaskQueue(
        redis_url, results=redis_server.url(1), broker_options={"visibility_timeout": LEASE_S}
    )
    journal = tmp_path / "journal"
    # lease_s = the broker's visibility timeout: running tasks are renewed every second
    consumer = {"concurrency": 4, "lease_s": LEASE_S}
    deployment = apps.worker_deployment(queue, consumer=consumer, health_check_period_s=1)
    handle = await serve_apps.run(deployment.bind(str(journal)), "crash")
    old_pid = await handle.pid.remote()
    sent = {}
    for i in range(8):
        key = f"k{i}"
        sent[key] = (await queue.send_task("serve_tests.work", args=[key, 2.0])).id

    def started_by(pid: int) -> set[str]:
        return {e.key for e in apps.journal_read(journal) if e.event == "start" and e.pid == pid}

    await eventually(lambda: len(started_by(old_pid)) == 4, timeout=60, what="4 tasks running")
    os.kill(old_pid, signal.SIGKILL)
    entries = apps.journal_read(journal)
    killed = started_by(old_pid) - {e.key for e in entries if e.event == "done"}
    assert killed, "every task had finished before the kill"

    await eventually(
        lambda: len(apps.journal_counts(journal, "done")) == 8, timeout=120, what="8 tasks done"
    )
    entries = apps.journal_read(journal)
    new_pids = {e.pid for e in entries if e.event == "done"} - {old_pid}
    assert len(new_pids) == 1, entries
    new_pid = new_pids.pop()
    assert await handle.pid.remote() == new_pid  # Serve's replacement replica
    for key, task_id in sent.items():
        result = await queue.result(task_id).get(timeout=30)
        dones = [e.pid for e in entries if e.key == key and e.event == "done"]
        assert len(dones) == 1, f"{key} finished {len(dones)} times: {entries}"
        if key in killed:  # held by the killed replica: redelivered to the new one
            assert result["pid"] == new_pid
            starts = [e.pid for e in entries if e.key == key and e.event == "start"]
            assert starts == [old_pid, new_pid], f"{key}: {entries}"
    assert (await queue.depth()).total == 0
    await queue.close()
