"""Run the comparison: serve_queue against Celery 5.7 and Ray Serve's task consumer.

    python -m benchmarks.run [--quick] [--scenarios noop,latency] [--broker redis]
                             [--repeats N] [--out benchmarks/results]

Starts its own ``redis-server`` on a free loopback port (and a local Ray cluster for the
``serve`` scenario), runs every side of every scenario in its own consumer process, the sides
interleaved (A B A B ...), and prints a table of medians, min-max and ours/peer ratios measured
in the same session. Writes ``results.json`` (every raw run) and PNG plots to ``--out``.
Scenarios: ``noop``, ``noop_results``, ``io``, ``enqueue``, ``latency``, ``serve``, ``memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import report, scenarios
from benchmarks.harness import Bench, RunFailed, load_average
from benchmarks.progress import Progress
from benchmarks.rabbitmq_bench import SCENARIOS as RABBITMQ_SCENARIOS
from benchmarks.rabbitmq_bench import RabbitBench, rabbitmq_scenarios
from benchmarks.serve_bench import ServeBench, serve_scenario

ALL = ("noop", "noop_results", "io", "enqueue", "latency", "serve", "memory")


def build(names: list[str], bench: Bench, serve_bench: ServeBench) -> list[scenarios.Scenario]:
    makers = {
        "noop": lambda: scenarios.noop_scenario(bench, results=False),
        "noop_results": lambda: scenarios.noop_scenario(bench, results=True),
        "io": lambda: scenarios.io_scenario(bench),
        "enqueue": lambda: scenarios.enqueue_scenario(bench),
        "latency": lambda: scenarios.latency_scenario(bench),
        "serve": lambda: serve_scenario(serve_bench),
        "memory": lambda: scenarios.memory_scenario(bench),
    }
    return [makers[name]() for name in names]


def run_session(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    size = scenarios.QUICK if args.quick else scenarios.FULL
    repeats = args.repeats or size.repeats
    session: dict[str, Any] = {"meta": _meta(args, size, repeats), "scenarios": []}
    serve_bench, rabbit = ServeBench(), RabbitBench()
    with Bench.open() as bench:
        if args.broker == "rabbitmq":
            built = rabbitmq_scenarios(rabbit, serve_bench, names)
        else:
            built = build(names, bench, serve_bench)
        records = [report.scenario_record(sc) for sc in built]
        session["scenarios"] = records
        plan = [(sc, rec, i, side) for sc, rec in zip(built, records, strict=True)
                for i in range(repeats) for side in range(len(sc.sides))]  # fmt: skip
        progress = Progress(len(plan))
        try:
            for sc, rec, i, k in plan:
                side, out = sc.sides[k], rec["sides"][k]
                progress.step(f"{sc.name} {side.label} #{i + 1}")
                if args.quick and not side.quick:
                    out["skipped"] = "left out of --quick runs (run without --quick)"
                    continue
                out["runs"].append(_one_run(side, bench, size, i))
                _save(session, args.out)  # a session cut short still leaves its runs
        finally:
            progress.close()
            serve_bench.close()
            rabbit.close()
    session["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save(session, args.out)
    return session


def _save(session: dict[str, Any], out: Path) -> None:
    for rec in session["scenarios"]:
        for side in rec["sides"]:
            side["summary"] = report.summarise(side)
    session["meta"]["load_end"] = load_average()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(session, indent=1))
    tmp.replace(out / "results.json")


def _one_run(side: scenarios.Side, bench: Bench, size: scenarios.Size, i: int) -> dict[str, Any]:
    load = load_average()
    started = time.time()
    try:
        result = side.run(bench, size)
    except RunFailed as exc:
        return {"ok": False, "error": str(exc), "repeat": i, "load": load}
    except Exception as exc:  # a broken peer must not end the session: report it
        traceback.print_exc(file=sys.stderr)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400], "repeat": i,
                "load": load}  # fmt: skip
    return {"ok": True, "repeat": i, "load": load, "at": started, **result}


def _source_state() -> dict[str, Any]:
    """The commit measured, and which engine files differed from it (uncommitted work)."""
    root = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    dirty = [
        line.strip()
        for line in git("status", "--short", "--", "serve_queue", "adapters").splitlines()
    ]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": dirty}


def _meta(args: argparse.Namespace, size: scenarios.Size, repeats: int) -> dict[str, Any]:
    versions = {}
    for dist in ("serve-queue", "celery", "kombu", "redis", "ray"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
            "quick": args.quick, "repeats": repeats, "sizes": vars(size),
            "broker": args.broker, "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.platform(), "versions": versions,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_start": load_average(), "source": _source_state()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, one repeat (~1 min)")
    parser.add_argument("--scenarios", default=",".join(ALL), help=f"comma list of {ALL}")
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeat count")
    parser.add_argument("--out", default="benchmarks/results", type=Path)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {ALL}")
    if args.broker == "rabbitmq":
        left_out = [n for n in names if n not in RABBITMQ_SCENARIOS]
        if left_out:
            print(f"RabbitMQ: {', '.join(left_out)} run on Redis only; not run here",
                  file=sys.stderr)  # fmt: skip
        names = [n for n in names if n in RABBITMQ_SCENARIOS]
    session = run_session(args, names)
    print()
    print(
        f"{session['meta']['command']}  (load average {session['meta']['load_start']:.2f} "
        f"at start, {session['meta']['load_end']:.2f} at end, {session['meta']['cpus']} CPUs)"
    )
    source = session["meta"]["source"]
    if source["uncommitted"]:
        dirty = ", ".join(source["uncommitted"])
        print(f"measured at {source['commit']} plus uncommitted changes: {dirty}")
    print(report.table(session))
    written = report.plots(session, args.out)
    print(
        f"\nraw runs: {args.out / 'results.json'}; plots: "
        f"{', '.join(str(p) for p in written) or 'none'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
