"""The public surface is one sorted ``__all__``; changing it is a deliberate act.

Every public name is pinned to the module that defines it: ``serve_queue.X`` must be that very
object, so a re-export that drifts (a stale copy, a shadowing import, a wrong class under a
right name) fails here.
"""

from __future__ import annotations

import importlib
import re

import pytest

import serve_queue
from serve_queue import errors

#: public name -> the module that defines it
HOME = {
    "Ack": "serve_queue.types",
    "AsyncResult": "serve_queue.producer",
    "BacklogPolicy": "serve_queue.serve",
    "BrokerAdapter": "serve_queue.types",
    "BrokerError": "serve_queue.errors",
    "BrokerURL": "serve_queue.config",
    "BrokerUnavailable": "serve_queue.errors",
    "ConfigurationError": "serve_queue.errors",
    "Consumer": "serve_queue.consumer",
    "ConsumerConfig": "serve_queue.config",
    "ContentDisallowed": "serve_queue.errors",
    "DeadLetter": "serve_queue.types",
    "DecodeError": "serve_queue.errors",
    "Delivery": "serve_queue.types",
    "EncodeError": "serve_queue.errors",
    "Health": "serve_queue.consumer",
    "InvalidArguments": "serve_queue.errors",
    "MessageError": "serve_queue.errors",
    "MissingDependency": "serve_queue.errors",
    "OutgoingMessage": "serve_queue.types",
    "Producer": "serve_queue.producer",
    "QueueDepth": "serve_queue.types",
    "Registry": "serve_queue.registry",
    "Reject": "serve_queue.errors",
    "Requeue": "serve_queue.types",
    "ResultBackend": "serve_queue.types",
    "ResultBackendError": "serve_queue.errors",
    "Retry": "serve_queue.errors",
    "RetryPolicy": "serve_queue.config",
    "ServeQueueError": "serve_queue.errors",
    "TaskFailed": "serve_queue.errors",
    "TaskOptions": "serve_queue.config",
    "TaskQueue": "serve_queue.taskqueue",
    "TaskRevoked": "serve_queue.errors",
    "TaskTimeout": "serve_queue.errors",
    "UnknownTask": "serve_queue.errors",
    "task": "serve_queue.registry",
}
PUBLIC = sorted(HOME)


def test_all_is_sorted_and_pinned() -> None:
    assert serve_queue.__all__ == sorted(serve_queue.__all__)
    assert serve_queue.__all__ == PUBLIC


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_the_object_its_home_module_defines(name: str) -> None:
    home = importlib.import_module(HOME[name])
    exported = getattr(serve_queue, name)
    assert exported is getattr(home, name)
    assert exported.__module__ == HOME[name]
    assert exported.__name__ == name


def test_the_whole_error_tree_is_public() -> None:
    """Every error ``serve_queue.errors`` documents can be caught as ``serve_queue.X``."""
    assert set(errors.__all__) <= set(serve_queue.__all__)
    for name in errors.__all__:
        assert re.search(rf"\b{name}\b", errors.__doc__ or ""), f"{name} is not in the tree"


def test_every_error_is_a_serve_queue_error() -> None:
    tree = {n for n in errors.__all__ if n not in ("Retry", "Reject")}  # control flow
    for name in tree:
        assert issubclass(getattr(serve_queue, name), serve_queue.ServeQueueError), name
    assert not issubclass(serve_queue.Retry, serve_queue.ServeQueueError)
    assert not issubclass(serve_queue.Reject, serve_queue.ServeQueueError)
