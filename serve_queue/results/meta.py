"""Celery 5.7 task meta: states, builders, exception encoding and decoding.

Every builder returns the dict Celery's worker would store, with its keys in Celery's order::

    status, result, traceback, children, date_done, [group_id], [parent_id], task_id

``date_done`` is an ISO 8601 UTC time (``+00:00``) for ready states and ``None`` otherwise.
Exceptions are encoded as ``{"exc_type": qualname, "exc_message": list(args),
"exc_module": module}``, which Celery's ``AsyncResult`` turns back into the same class when the
module is loaded in the reading process (``builtins`` always is). serve_queue's own failure
kinds are written under the names Celery uses for them (``NotRegistered``, ``Reject``,
``TimeLimitExceeded``, ...), so a Celery client sees what a Celery worker would have stored.
"""

from __future__ import annotations

import json
import logging
import traceback as tb_module
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from kombu.exceptions import EncodeError
from kombu.utils import json as kombu_json

from serve_queue.errors import Retry, TaskFailed, TaskRevoked

__all__ = [
    "EXCEPTION_STATES",
    "FAILURE",
    "PENDING",
    "READY_STATES",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "MaxRetriesExceededError",
    "decode_meta",
    "encode_exception",
    "encode_meta",
    "exception_from_meta",
    "failure_meta",
    "invalid_arguments_meta",
    "is_ready",
    "max_retries_exceeded",
    "not_registered_meta",
    "reject_meta",
    "retry_meta",
    "revoked_meta",
    "soft_time_limit_meta",
    "started_meta",
    "success_meta",
    "time_limit_meta",
]

log = logging.getLogger("serve_queue.results")

_kombu_dumps: Callable[[Any], str] = kombu_json.dumps
loads: Callable[[str | bytes], Any] = kombu_json.loads


def dumps(value: Any) -> str:
    """kombu's JSON (``__type__`` markers for datetime, Decimal, UUID, bytes). A value of plain
    JSON types comes out byte-identical from the stdlib's C encoder, which is tried first: it
    refuses (TypeError) exactly the values kombu's encoder would have to mark."""
    try:
        return json.dumps(value)
    except TypeError:
        return _kombu_dumps(value)

PENDING = "PENDING"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
#: states after which nothing more happens to the task (``AsyncResult.get()`` returns)
READY_STATES: frozenset[str] = frozenset({SUCCESS, FAILURE, REVOKED})
#: states whose ``result`` is an encoded exception
EXCEPTION_STATES: frozenset[str] = frozenset({RETRY, FAILURE, REVOKED})

_CELERY = "celery.exceptions"
_BILLIARD = "billiard.exceptions"

#: serve_queue exception qualname -> (module, qualname) Celery writes for the same failure
_WIRE_NAMES: dict[str, tuple[str, str]] = {
    "UnknownTask": (_CELERY, "NotRegistered"),
    "Reject": (_CELERY, "Reject"),
    "MaxRetriesExceededError": (_CELERY, "MaxRetriesExceededError"),
    "TaskRevoked": (_CELERY, "TaskRevokedError"),
    "TimeLimitExceeded": (_BILLIARD, "TimeLimitExceeded"),
    "SoftTimeLimitExceeded": (_BILLIARD, "SoftTimeLimitExceeded"),
    "InvalidArguments": ("builtins", "TypeError"),
}


class MaxRetriesExceededError(Exception):
    """A task asked to be retried once more than its ``max_retries`` allows.

    Stored as Celery's ``celery.exceptions.MaxRetriesExceededError`` with Celery's message.
    """

    def __init__(self, message: str, *, max_retries: int | None = None) -> None:
        super().__init__(message)
        self.max_retries = max_retries


def max_retries_exceeded(
    name: str,
    task_id: str,
    max_retries: int | None = None,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> MaxRetriesExceededError:
    """The exception Celery raises when ``retry()`` is called with no retries left."""
    message = f"Can't retry {name}[{task_id}] args:{tuple(args)} kwargs:{dict(kwargs or {})}"
    return MaxRetriesExceededError(message, max_retries=max_retries)


# -- exception encoding ----------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    try:
        dumps(value)
    except Exception:  # anything the encoder rejects is sent as its repr
        try:
            return repr(value)
        except Exception:
            return f"<unrepresentable {type(value).__qualname__}>"
    return value


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _wire_args(exc: BaseException, qualname: str) -> list[Any]:
    """``exc.args`` as Celery would have them for serve_queue's own failure kinds."""
    args = list(exc.args)
    if qualname == "Reject":  # celery.exceptions.Reject(reason, requeue)
        return [getattr(exc, "reason", args[0] if args else None), False]
    if qualname == "UnknownTask":  # NotRegistered(name)
        return [getattr(exc, "name", args[0] if args else None)]
    if qualname == "TimeLimitExceeded":
        return [_number(a) for a in args]
    return args


def encode_exception(exc: BaseException) -> dict[str, Any]:
    """``exc`` as Celery's JSON result serializer writes it (args made JSON-safe)."""
    cls = type(exc)
    module, qualname = cls.__module__, cls.__qualname__
    args = list(exc.args)
    if module.startswith("serve_queue") and qualname in _WIRE_NAMES:
        args = _wire_args(exc, qualname)
        module, qualname = _WIRE_NAMES[qualname]
    return {
        "exc_type": qualname,
        "exc_message": [_json_safe(a) for a in args],
        "exc_module": module,
    }


def _celery_exception(exc_type: str, args: list[Any], module: str) -> dict[str, Any]:
    return {"exc_type": exc_type, "exc_message": args, "exc_module": module}


# -- meta builders -----------------------------------------------------------------------


def _meta(
    task_id: str,
    status: str,
    result: Any,
    traceback: str | None,
    *,
    children: list[Any] | None,
    parent_id: str | None,
    group_id: str | None,
) -> dict[str, Any]:
    ready = status in READY_STATES
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": children,
        "date_done": datetime.now(timezone.utc).isoformat() if ready else None,
    }
    if group_id:
        meta["group_id"] = group_id
    if parent_id:
        meta["parent_id"] = parent_id
    meta["task_id"] = task_id
    return meta


def started_meta(
    task_id: str,
    *,
    hostname: str,
    pid: int,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """STARTED, as written with ``task_track_started``: ``{"pid", "hostname"}``."""
    result = {"pid": pid, "hostname": hostname}
    return _meta(task_id, STARTED, result, None, children=[], **_links(parent_id, group_id))


def success_meta(
    task_id: str,
    result: Any,
    *,
    children: list[Any] | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """SUCCESS with the task's return value (encoded later, with kombu's JSON)."""
    kids = [] if children is None else children
    return _meta(task_id, SUCCESS, result, None, children=kids, **_links(parent_id, group_id))


def failure_meta(
    task_id: str,
    exc: BaseException,
    *,
    traceback: str | None,
    children: list[Any] | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """FAILURE with ``exc`` encoded the way Celery encodes exceptions."""
    kids = [] if children is None else children
    result = encode_exception(exc)
    return _meta(task_id, FAILURE, result, traceback, children=kids, **_links(parent_id, group_id))


def retry_meta(
    task_id: str,
    exc: BaseException | None,
    traceback: str | None = None,
    *,
    children: list[Any] | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """RETRY with the retry's ``exc`` (``None`` when the handler gave none).

    A ``serve_queue.Retry`` is unwrapped to its ``exc``, as Celery stores ``Retry.exc``.
    ``children`` defaults to the re-published message itself, as Celery lists it.
    """
    if isinstance(exc, Retry):
        exc = exc.exc
    result = None if exc is None else encode_exception(exc)
    kids = [[[task_id, None], None]] if children is None else children
    return _meta(task_id, RETRY, result, traceback, children=kids, **_links(parent_id, group_id))


def revoked_meta(
    task_id: str,
    reason: str = "revoked",
    *,
    children: list[Any] | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """REVOKED with ``TaskRevokedError(reason)``; ``reason`` is ``"revoked"`` or ``"expired"``.

    Celery writes ``children: null`` for a revoke command and ``[]`` for an expired message;
    that is the default here too.
    """
    kids = children if children is not None else ([] if reason == "expired" else None)
    result = _celery_exception("TaskRevokedError", [reason], _CELERY)
    return _meta(task_id, REVOKED, result, None, children=kids, **_links(parent_id, group_id))


def _links(parent_id: str | None, group_id: str | None) -> dict[str, str | None]:
    return {"parent_id": parent_id, "group_id": group_id}


def _internal_failure(
    task_id: str, exc: dict[str, Any], traceback: str | None, links: dict[str, str | None]
) -> dict[str, Any]:
    return _meta(task_id, FAILURE, exc, traceback, children=[], **links)


def not_registered_meta(
    task_id: str, name: str, *, parent_id: str | None = None, group_id: str | None = None
) -> dict[str, Any]:
    """FAILURE for an unknown task name: ``celery.exceptions.NotRegistered([name])``."""
    exc = _celery_exception("NotRegistered", [name], _CELERY)
    return _internal_failure(task_id, exc, None, _links(parent_id, group_id))


def reject_meta(
    task_id: str, reason: str, *, parent_id: str | None = None, group_id: str | None = None
) -> dict[str, Any]:
    """FAILURE for a rejected task: ``celery.exceptions.Reject([reason, False])``."""
    exc = _celery_exception("Reject", [_json_safe(reason), False], _CELERY)
    return _internal_failure(task_id, exc, None, _links(parent_id, group_id))


def time_limit_meta(
    task_id: str, limit: float, *, parent_id: str | None = None, group_id: str | None = None
) -> dict[str, Any]:
    """FAILURE for the hard time limit: ``billiard.exceptions.TimeLimitExceeded([limit])``."""
    exc = _celery_exception("TimeLimitExceeded", [_number(limit)], _BILLIARD)
    return _internal_failure(task_id, exc, None, _links(parent_id, group_id))


def soft_time_limit_meta(
    task_id: str,
    traceback: str | None = None,
    *,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """FAILURE for an uncaught soft time limit: ``SoftTimeLimitExceeded([])``."""
    exc = _celery_exception("SoftTimeLimitExceeded", [], _BILLIARD)
    return _internal_failure(task_id, exc, traceback, _links(parent_id, group_id))


def invalid_arguments_meta(
    task_id: str,
    message: str,
    traceback: str | None = None,
    *,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """FAILURE for arguments that do not bind: the ``TypeError`` Celery's call would raise."""
    exc = _celery_exception("TypeError", [message], "builtins")
    return _internal_failure(task_id, exc, traceback, _links(parent_id, group_id))


# -- serialization and decoding ---------------------------------------------------------


def encode_meta(task_id: str, meta: Mapping[str, Any]) -> str:
    """``meta`` as kombu JSON. A result that cannot be encoded is stored the way Celery does
    it: as FAILURE ``kombu.exceptions.EncodeError`` instead (never an error of the store)."""
    try:
        return dumps(meta)
    except (TypeError, ValueError, OverflowError) as exc:
        log.warning("task %s: result cannot be encoded, storing FAILURE: %s", task_id, exc)
        error = EncodeError(exc)
        text = "".join(tb_module.format_exception(error))
        links = {"parent_id": meta.get("parent_id"), "group_id": meta.get("group_id")}
        return dumps(failure_meta(task_id, error, traceback=text, **links))


def decode_meta(payload: str | bytes) -> dict[str, Any]:
    """A stored meta (kombu JSON: datetime, Decimal, UUID, bytes come back as such)."""
    meta = loads(payload)
    if not isinstance(meta, dict):
        raise ValueError(f"task meta is not a JSON object: {type(meta).__name__}")
    return meta


def is_ready(status: str | None) -> bool:
    """True for SUCCESS, FAILURE and REVOKED."""
    return status in READY_STATES


def exception_from_meta(task_id: str, meta: Mapping[str, Any]) -> TaskFailed:
    """The ``TaskFailed`` (``TaskRevoked`` for REVOKED) describing a failed task's meta."""
    result = meta.get("result")
    trace = meta.get("traceback")
    trace = trace if isinstance(trace, str) else None
    if isinstance(result, Mapping) and "exc_type" in result:
        exc_type = str(result["exc_type"])
        raw = result.get("exc_message")
        message = list(raw) if isinstance(raw, list | tuple) else ([] if raw is None else [raw])
        module = result.get("exc_module")
        module = str(module) if module is not None else None
    else:
        exc_type, message, module = "Exception", ([] if result is None else [result]), None
    cls = TaskRevoked if meta.get("status") == REVOKED else TaskFailed
    return cls(task_id, exc_type, message, module, trace)
