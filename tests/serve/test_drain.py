"""Drain on rollout: a new version replaces the replica while tasks are queued and running.

The old replica stops fetching, lets its running handlers finish within the drain budget and
hands every other message (prefetched, or cut off at the deadline) back at once. The broker's
visibility timeout is 300 s, so a message that waited for its lease to expire instead would
hold the test far past its bounded waits.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from serve_queue import TaskQueue
from tests.serve import apps
from tests.serve.conftest import ServeApps, eventually

pytestmark = pytest.mark.serve

VISIBILITY_TIMEOUT_S = 300.0


def versioned(queue: TaskQueue, journal: Path, version: str, **options: Any) -> Any:
    """The app at ``version`` (``serve.run`` of it again is a rollout: new replicas)."""
    consumer = options.pop("consumer")
    config = {"version": version}
    deployment = apps.worker_deployment(queue, consumer=consumer, user_config=config, **options)
    return deployment.bind(str(journal))


def executions_by_key(journal: Path) -> dict[str, list[apps.Entry]]:
    by_key: dict[str, list[apps.Entry]] = {}
    for entry in apps.journal_read(journal):
        by_key.setdefault(entry.key, []).append(entry)
    return by_key


def interrupted(entries: list[apps.Entry]) -> list[int]:
    """Pids that started this task and never finished it (cut off at a drain deadline)."""
    done = {e.pid for e in entries if e.event == "done"}
    return [e.pid for e in entries if e.event == "start" and e.pid not in done]


@pytest.mark.timeout(300)
async def test_redeploy_with_200_tasks_in_flight_completes_each_once(
    tmp_path: Path, serve_apps: ServeApps
) -> None:
    queue = TaskQueue(
        f"sqlite:///{tmp_path}/b.db", broker_options={"visibility_timeout": VISIBILITY_TIMEOUT_S}
    )
    journal = tmp_path / "journal"
    options: dict[str, Any] = {
        "consumer": {"concurrency": 16, "prefetch": 40},  # 24 prefetched beyond the running
        "graceful_shutdown_timeout_s": 20,  # drain budget 16 s: every handler finishes
    }
    handle = await serve_apps.run(versioned(queue, journal, "1", **options), "drain")
    old_pid = await handle.pid.remote()
    started = time.monotonic()
    sent = {}
    for i in range(200):
        key = f"t{i:03d}"
        sent[key] = (await queue.send_task("serve_tests.work", args=[key, 0.3 + (i % 8) / 10])).id

    def done() -> int:
        return len(apps.journal_counts(journal, "done"))

    await eventually(lambda: done() >= 30, timeout=90, what="30 tasks done on version 1")
    held = (await queue.depth()).reserved
    assert held > 16, f"the old replica holds {held} messages: none prefetched beyond running"

    redeployed = time.monotonic()
    handle = await serve_apps.run(versioned(queue, journal, "2", **options), "drain")
    new_pid = await handle.pid.remote()
    assert new_pid != old_pid
    await eventually(lambda: done() == 200, timeout=120, what="all 200 tasks done")
    finished = time.monotonic()

    for key, task_id in sent.items():
        assert await queue.result(task_id).state() == "SUCCESS", key
    by_key = executions_by_key(journal)
    assert sorted(by_key) == sorted(sent)
    for key, entries in by_key.items():
        dones = [e for e in entries if e.event == "done"]
        starts = [e for e in entries if e.event == "start"]
        assert len(dones) == 1, f"{key} finished {len(dones)} times: {entries}"
        # a second start is allowed only for a handler cut off by the deadline; with a 16 s
        # budget and handlers under 1 s, none is
        assert interrupted(entries) == [], f"{key} was cut off: {entries}"
        assert len(starts) == 1, f"{key} ran {len(starts)} times: {entries}"
    pids = {e.pid for entries in by_key.values() for e in entries if e.event == "done"}
    assert old_pid in pids
    assert new_pid in pids
    # the old replica's prefetched messages came back at once, not after the 300 s lease
    assert finished - started < VISIBILITY_TIMEOUT_S / 3, finished - started
    assert (await queue.depth()).total == 0
    print(f"\nredeployed at {redeployed - started:.1f}s, all done at {finished - started:.1f}s")
    await queue.close()


@pytest.mark.timeout(240)
async def test_handlers_cut_off_by_the_drain_deadline_run_again_at_once(
    tmp_path: Path, serve_apps: ServeApps
) -> None:
    """graceful_shutdown_timeout_s=5 leaves a 1 s drain budget (Serve first spends its 2 s
    wait loop, 2 s stay in reserve) for 6 s handlers: they are cancelled, handed back before
    Serve kills the replica (not after their lease), and run to the end once more."""
    queue = TaskQueue(
        f"sqlite:///{tmp_path}/b.db", broker_options={"visibility_timeout": VISIBILITY_TIMEOUT_S}
    )
    journal = tmp_path / "journal"
    options: dict[str, Any] = {
        "consumer": {"concurrency": 3, "prefetch": 6},
        "graceful_shutdown_timeout_s": 5,
    }
    handle = await serve_apps.run(versioned(queue, journal, "1", **options), "cutoff")
    old_pid = await handle.pid.remote()
    started = time.monotonic()
    sent = {}
    for i in range(6):
        key = f"long{i}"
        sent[key] = (await queue.send_task("serve_tests.work", args=[key, 6.0])).id

    await eventually(
        lambda: sum(apps.journal_counts(journal, "start").values()) == 3,
        timeout=60,
        what="3 long tasks running on version 1",
    )
    handle = await serve_apps.run(versioned(queue, journal, "2", **options), "cutoff")
    new_pid = await handle.pid.remote()
    await eventually(
        lambda: len(apps.journal_counts(journal, "done")) == 6, timeout=90, what="6 tasks done"
    )
    elapsed = time.monotonic() - started

    by_key = executions_by_key(journal)
    cut = {key for key, entries in by_key.items() if interrupted(entries)}
    assert cut, f"no handler was cut off by the 1 s drain budget: {by_key}"
    for key, entries in by_key.items():
        assert await queue.result(sent[key]).state() == "SUCCESS", key
        dones = [e.pid for e in entries if e.event == "done"]
        starts = [e.pid for e in entries if e.event == "start"]
        if key in cut:  # ran twice: cut off on the old replica, then to the end on the new
            assert starts == [old_pid, new_pid], f"{key}: {entries}"
            assert dones == [new_pid], f"{key}: {entries}"
        else:
            assert len(starts) == 1, f"{key}: {entries}"
            assert len(dones) == 1, f"{key}: {entries}"
    assert elapsed < VISIBILITY_TIMEOUT_S / 3, elapsed
    await queue.close()
