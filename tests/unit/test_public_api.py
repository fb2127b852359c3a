"""The public surface is one sorted ``__all__``; changing it is a deliberate act."""

from __future__ import annotations

import serve_queue

PUBLIC = [
    "Ack", "AsyncResult", "BacklogPolicy", "BrokerAdapter", "BrokerError", "BrokerURL",
    "BrokerUnavailable", "ConfigurationError", "Consumer", "ConsumerConfig", "ContentDisallowed",
    "DeadLetter", "DecodeError", "Delivery", "Health", "InvalidArguments", "MessageError",
    "MissingDependency", "OutgoingMessage", "Producer", "QueueDepth", "Registry", "Reject",
    "Requeue", "ResultBackend", "ResultBackendError", "Retry", "RetryPolicy", "ServeQueueError",
    "TaskFailed", "TaskOptions", "TaskQueue", "TaskRevoked", "TaskTimeout", "UnknownTask", "task",
]  # fmt: skip


def test_all_is_sorted_and_pinned() -> None:
    assert serve_queue.__all__ == sorted(serve_queue.__all__)
    assert serve_queue.__all__ == PUBLIC


def test_every_public_name_resolves() -> None:
    for name in serve_queue.__all__:
        assert getattr(serve_queue, name) is not None


def test_every_error_is_a_serve_queue_error() -> None:
    errors = [getattr(serve_queue, n) for n in PUBLIC if n.endswith(("Error", "Unavailable"))]
    errors += [serve_queue.ContentDisallowed, serve_queue.InvalidArguments, serve_queue.UnknownTask]
    for error in errors:
        assert issubclass(error, serve_queue.ServeQueueError), error
