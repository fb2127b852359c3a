"""Quick start: send tasks and run a worker on Redis, in one script.

REDIS_URL=redis://127.0.0.1:6379 python examples/quickstart.py
"""

import asyncio
import os

from serve_queue import Reject, TaskFailed, TaskQueue, task

REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
queue = TaskQueue(f"{REDIS}/0", results=f"{REDIS}/1")


class Handlers:
    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:  # async def: runs on the event loop
        return x + y

    @task("tasks.resize")  # a plain def runs on the bounded thread pool
    def resize(self, path: str) -> str:
        if not path.endswith(".png"):
            raise Reject(f"not a PNG: {path}")  # dead-lettered, FAILURE stored
        return path.replace(".png", ".small.png")


async def main() -> None:
    worker = queue.worker(Handlers(), queues=["celery"], concurrency=200, threads=8)
    async with worker:  # or: await worker.start(); ...; await worker.stop(drain_timeout=30)
        result = await queue.send_task("tasks.add", args=[2, 3])
        print(result.id, await result.get(timeout=10), await result.state())

        resized = await queue.send_task("tasks.resize", args=["cat.png"])
        print(await resized.get(timeout=10))

        refused = await queue.send_task("tasks.resize", args=["cat.gif"])
        try:
            await refused.get(timeout=10)
        except TaskFailed as exc:
            print("failed as expected:", exc.exc_type, exc.exc_message)
    await queue.close()


if __name__ == "__main__":
    asyncio.run(main())
