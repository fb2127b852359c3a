"""The Serve application: an ingress that enqueues, a consumer that indexes.

Deploy it like any Serve app, e.g. ``serve run examples/document_indexing/serve_config.yaml``,
or ``serve.run(...)`` as ``__main__.py`` does. The broker comes from ``$SERVE_QUEUE_BROKER``;
without it, the embedded SQLite broker (no server needed).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_queue import TaskQueue, task

queue = TaskQueue(os.environ.get("SERVE_QUEUE_BROKER") or None)

#: how long indexing one document takes (the motivating notebook's 5 s)
INDEX_SECONDS = float(os.environ.get("INDEX_SECONDS", "5"))


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
class Indexer:
    """Stands in for the model: called by the consumer through a DeploymentHandle."""

    async def index(self, document_id: str) -> dict[str, Any]:
        await asyncio.sleep(INDEX_SECONDS)
        return {"document_id": document_id, "terms": len(document_id) * 7}


@serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=60, ray_actor_options={"num_cpus": 0})
@queue.consumer(concurrency=100, threads=4, queues=["celery"])
class TaskProcessor:
    def __init__(self, indexer: DeploymentHandle) -> None:
        self.indexer = indexer  # handlers share the replica's state
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    @task("document_indexing_task", max_retries=3)
    async def index_document(self, document_id: str) -> dict[str, Any]:
        started_at = time.time()
        indexed = await self.indexer.index.remote(document_id)
        return {
            **indexed,
            "replica": self.replica,
            "started_at": started_at,
            "finished_at": time.time(),
        }


api = FastAPI(title="document indexing")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200)
@serve.ingress(api)
class MyApp:
    @api.post("/documents/{document_id}/index")
    async def enqueue(self, document_id: str) -> dict[str, str]:
        result = await queue.send_task("document_indexing_task", args=[document_id])
        return {"task_id": result.id}

    @api.get("/tasks/{task_id}")
    async def status(self, task_id: str) -> dict[str, Any]:
        meta = await queue.result(task_id).meta()
        if meta is None:
            return {"task_id": task_id, "state": "PENDING", "result": None}
        return {"task_id": task_id, "state": meta["status"], "result": meta.get("result")}


app = MyApp.bind()
processor = TaskProcessor.bind(Indexer.bind())
