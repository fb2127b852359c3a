"""Every error serve_queue raises, in one tree, plus the handler control-flow exceptions.

::

    ServeQueueError
    ├── ConfigurationError          a bad URL, option or handler definition (deploy time)
    │   └── MissingDependency       an optional extra is not installed (names the pip extra)
    ├── BrokerError                 the broker misbehaved; the adapter's client error is the cause
    │   └── BrokerUnavailable       cannot connect / connection lost (retryable)
    ├── ResultBackendError          the result backend misbehaved
    ├── MessageError                a message cannot be used as a task (dead-lettered)
    │   ├── DecodeError             undecodable envelope, body, content type or protocol
    │   ├── ContentDisallowed       a serializer that was not explicitly allowed
    │   ├── UnknownTask             no handler is registered under the task name
    │   └── InvalidArguments        arguments do not bind to / validate against the handler
    ├── EncodeError                 a task message cannot be built (options, unserializable data)
    ├── TaskTimeout                 waiting for a result took longer than asked
    └── TaskFailed                  the task failed remotely; carries the remote type and message
        └── TaskRevoked             the task was revoked or expired before it ran

Handler control flow (not errors; raised by a handler to choose its outcome):
``Retry(delay_s)`` re-publishes the task later, ``Reject(reason)`` dead-letters it.

Adapters translate their client's exceptions into this tree at the edge, always with
``raise ... from exc`` so the cause is kept.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "ConfigurationError",
    "ContentDisallowed",
    "DecodeError",
    "EncodeError",
    "InvalidArguments",
    "MessageError",
    "MissingDependency",
    "Reject",
    "ResultBackendError",
    "Retry",
    "ServeQueueError",
    "TaskFailed",
    "TaskRevoked",
    "TaskTimeout",
    "UnknownTask",
]


class ServeQueueError(Exception):
    """Root of every error serve_queue raises."""


class ConfigurationError(ServeQueueError):
    """A URL, option or handler definition is wrong; raised at construction or deploy time."""


class MissingDependency(ConfigurationError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed; install it with: pip install 'serve-queue[{extra}]'"
        )
        self.package = package
        self.extra = extra


class BrokerError(ServeQueueError):
    """The broker failed an operation. ``__cause__`` holds the client's own exception."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached or the connection was lost; retrying may succeed."""


class ResultBackendError(ServeQueueError):
    """The result backend failed an operation."""


class MessageError(ServeQueueError):
    """A delivered message cannot be run as a task. The consumer dead-letters it."""


class DecodeError(MessageError):
    """The envelope, content type, encoding, body or task protocol cannot be decoded."""


class ContentDisallowed(DecodeError):
    """The message uses a serializer that was not explicitly allowed (pickle, yaml, ...)."""


class UnknownTask(MessageError):
    """No handler is registered under the message's task name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no handler is registered for task {name!r}")
        self.name = name


class InvalidArguments(MessageError):
    """The message's args/kwargs do not bind to, or fail validation against, the handler."""


class EncodeError(ServeQueueError):
    """A task message cannot be built: invalid send options, an unknown serializer or
    compression, or arguments/results the serializer cannot encode (the cause is kept)."""


class TaskTimeout(ServeQueueError, TimeoutError):
    """Waiting for a task's result took longer than the given timeout."""


class TaskFailed(ServeQueueError):
    """The task ended in FAILURE. ``exc_type``, ``exc_module`` and ``exc_message`` describe the
    remote exception as Celery encodes it; ``traceback`` is the remote traceback text if any."""

    def __init__(
        self,
        task_id: str,
        exc_type: str,
        exc_message: list[Any],
        exc_module: str | None = None,
        traceback: str | None = None,
    ) -> None:
        detail = ", ".join(repr(a) if not isinstance(a, str) else a for a in exc_message)
        super().__init__(f"task {task_id} failed: {exc_type}({detail})")
        self.task_id = task_id
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.exc_module = exc_module
        self.traceback = traceback


class TaskRevoked(TaskFailed):
    """The task was revoked or had expired before it could run."""


class Retry(Exception):
    """Raised by a handler: run this task again after ``delay_s`` seconds.

    The message is re-published the way Celery does it (same id, ``retries + 1``, an ``eta``),
    and RETRY is stored. When the task's ``max_retries`` is used up, the task fails with
    ``exc`` if given, else with ``MaxRetriesExceededError``.
    """

    def __init__(self, delay_s: float | None = None, *, exc: BaseException | None = None) -> None:
        super().__init__(f"retry in {delay_s}s" if delay_s is not None else "retry")
        self.delay_s = delay_s
        self.exc = exc


class Reject(Exception):
    """Raised by a handler: dead-letter this message with ``reason`` and store FAILURE."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
