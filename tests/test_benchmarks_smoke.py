"""The benchmark harness works end to end (a smoke check, never a speed check).

Runs ``python -m benchmarks.run --quick`` on a few cheap scenarios per broker in a subprocess
(its own redis-server and, for RabbitMQ, its own node; our consumer and a Celery worker as
subprocesses) and checks that it exits 0 and writes the raw runs and a plot. No timing is
asserted: benchmarks are not tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the sides a --quick run leaves out on purpose (``Side(quick=False)``); every other side of
#: the chosen scenarios must run (``results.json`` records ``"skipped": null`` for those, so a
#: check on the key's presence alone could never fail)
LEFT_OUT = {"serve_queue (stdlib asyncio loop)", "celery solo", "celery prefork c2"}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("broker", "names", "plot", "peers"),
    [
        (
            "redis",
            ["noop", "enqueue"],
            "throughput.png",
            {"celery threads c10", "taskiq (async) c100"},
        ),
        (
            "rabbitmq",
            ["noop", "enqueue", "memory"],
            "memory.png",
            {"celery threads c10", "raw AMQP client (broker ceiling)"},  # the bare-client sides too
        ),
    ],
)
def test_quick_benchmark_writes_results_and_plots(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    broker: str,
    names: list[str],
    plot: str,
    peers: set[str],
) -> None:
    if broker == "rabbitmq":
        request.getfixturevalue("rabbitmq_server")  # skips without rabbitmq-server (not in CI)
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--broker", broker,
         "--scenarios", ",".join(names), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    session = json.loads((out / "results.json").read_text())
    assert [sc["name"] for sc in session["scenarios"]] == names
    for scenario in session["scenarios"]:
        ours = scenario["sides"][0]
        assert ours["ours"] and ours["runs"], scenario["name"]
        assert all(run["ok"] for run in ours["runs"]), ours["runs"]
        assert ours["runs"][0]["value"] > 0
        for side in scenario["sides"]:  # every side a quick run should run did, and ran well
            if side["label"] in LEFT_OUT:
                assert side["skipped"] and not side["runs"], side
            else:
                assert not side["skipped"], side
                assert side["runs"] and all(run["ok"] for run in side["runs"]), side
    ran = {side["label"] for sc in session["scenarios"] for side in sc["sides"] if side["runs"]}
    assert peers <= ran, peers - ran
    assert (out / plot).stat().st_size > 0
    assert "ours/peer" in done.stdout
