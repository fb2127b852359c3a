"""Run the document-indexing scenario end to end and report.

    python -m examples.document_indexing [--broker redis://...] [--documents 30]

Starts a local Ray cluster and the Serve apps of ``app.py``, enqueues the documents in
parallel over HTTP, polls each task's status until done, prints a summary table and writes a
histogram of time per task (enqueue to finish) as a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def enqueue_and_poll(base: str, documents: list[str], timeout: float) -> list[dict[str, Any]]:
    """POST every document at once, then poll each task until it is ready."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def enqueue(doc: str) -> dict[str, Any]:
            sent = time.time()
            response = await client.post(f"/my_app/documents/{doc}/index")
            response.raise_for_status()
            return {"document_id": doc, "task_id": response.json()["task_id"], "sent_at": sent}

        rows = await asyncio.gather(*(enqueue(d) for d in documents))
        print(
            f"enqueued {len(rows)} documents in {time.time() - rows[0]['sent_at']:.2f}s", flush=True
        )
        deadline = time.monotonic() + timeout
        pending = {row["task_id"]: row for row in rows}
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            states = await asyncio.gather(*(client.get(f"/my_app/tasks/{t}") for t in pending))
            for response in states:
                status = response.json()
                if status["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
                    row = pending.pop(status["task_id"])
                    row.update(
                        state=status["state"], result=status["result"], seen_done_at=time.time()
                    )
        for row in pending.values():
            row.update(state="TIMEOUT", result=None)
        return list(rows)


def report(rows: list[dict[str, Any]], png: Path, work_s: float) -> None:
    """Print the summary table and write the histogram."""
    print(
        f"\n{'document':<14} {'state':<8} {'replica':<22} {'wait s':>7} {'run s':>6} {'total s':>8}"
    )
    totals = []
    for row in rows:
        result = row["result"] if isinstance(row["result"], dict) else {}
        wait = run = total = float("nan")
        if row["state"] == "SUCCESS":
            wait = result["started_at"] - row["sent_at"]
            run = result["finished_at"] - result["started_at"]
            total = result["finished_at"] - row["sent_at"]
            totals.append(total)
        replica = str(result.get("replica", "-"))[:22]
        print(
            f"{row['document_id'][:14]:<14} {row['state']:<8} {replica:<22}"
            f" {wait:>7.2f} {run:>6.2f} {total:>8.2f}"
        )
    done = sum(r["state"] == "SUCCESS" for r in rows)
    print(f"\n{done}/{len(rows)} succeeded", end="")
    if totals:
        print(
            f"; time per task (enqueue to finish): min {min(totals):.2f}s, "
            f"median {statistics.median(totals):.2f}s, max {max(totals):.2f}s"
        )
    else:
        print()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    right = max([*totals, work_s]) * 1.15 or 1.0
    ax.hist(totals or [0.0], bins=40, range=(0, right), color="#3b7dd8", edgecolor="white")
    ax.axvline(work_s, color="#444444", linestyle="--", linewidth=1)
    ax.annotate(
        f"indexing work itself: {work_s:g} s ",
        (work_s, 0.95),
        xycoords=("data", "axes fraction"),
        ha="right",
        va="top",
        fontsize=9,
        color="#444444",
    )
    ax.set_xlim(0, right)
    ax.set_xlabel("time per task, enqueue to finish (s)")
    ax.set_ylabel("tasks")
    median = f", median {statistics.median(totals):.2f} s" if totals else ""
    ax.set_title(f"document indexing: {done}/{len(rows)} tasks on serve_queue{median}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"histogram written to {png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", default=None, help="broker URL (default: embedded SQLite)")
    parser.add_argument("--documents", type=int, default=30)
    parser.add_argument("--index-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "document_indexing")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    parser.add_argument("--http-port", type=int, help="its Serve HTTP port (with --ray-address)")
    args = parser.parse_args(argv)

    env = {"INDEX_SECONDS": str(args.index_seconds), "PYTHONPATH": str(REPO)}
    if args.broker:
        env["SERVE_QUEUE_BROKER"] = args.broker
    os.environ.update(env)  # the driver imports app.py too: same settings on both sides

    import ray
    from ray import serve

    own_cluster = args.ray_address is None
    ray.init(
        address=args.ray_address or "local",
        num_cpus=4 if own_cluster else None,
        include_dashboard=False if own_cluster else None,
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    port = args.http_port or _free_port()
    if own_cluster:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    from examples.document_indexing.app import app, processor, queue

    print(f"broker: {queue.broker_url}; results: {queue.results_url}", flush=True)
    ok = False
    try:
        serve.run(processor, name="task_processor", route_prefix="/task_processor")
        serve.run(app, name="my_app", route_prefix="/my_app")
        documents = [f"doc-{uuid.uuid4().hex[:8]}" for _ in range(args.documents)]
        rows = asyncio.run(enqueue_and_poll(f"http://127.0.0.1:{port}", documents, args.timeout))
        report(rows, args.out / "time_per_task.png", args.index_seconds)
        ok = all(r["state"] == "SUCCESS" for r in rows)
    finally:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete("my_app")
            serve.delete("task_processor")
        ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
