"""A consumer process for the contract's crash test, meant to be killed with SIGKILL.

Run as ``python -m tests.adapters._crash_consumer`` with a JSON spec on stdin:
``{"target": "module:Class", "kwargs": {...}, "queue": "...", "count": N}``. It builds
``Class(**kwargs)``, connects, takes ``count`` deliveries with ``prefetch=count`` and prints the
hex of each body on its own line as it arrives. It never settles, never closes the iterator
and never closes the adapter: it waits to be killed holding the deliveries.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from typing import Any


async def hold(spec: dict[str, Any]) -> None:
    module_name, _, class_name = str(spec["target"]).partition(":")
    adapter = getattr(importlib.import_module(module_name), class_name)(**spec["kwargs"])
    await adapter.connect()
    count = int(spec["count"])
    deliveries = adapter.deliveries([spec["queue"]], count)
    for _ in range(count):
        delivery = await deliveries.__anext__()
        sys.stdout.write(delivery.body.hex() + "\n")
        sys.stdout.flush()
    await asyncio.Event().wait()  # holding everything until SIGKILL


if __name__ == "__main__":
    asyncio.run(hold(json.load(sys.stdin)))
