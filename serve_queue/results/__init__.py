"""Result backends, storing task states and results the way Celery 5.7 does.

- ``RedisResultBackend``: Celery's Redis backend (key, kombu JSON, TTL, PUBLISH), readable by
  ``celery.result.AsyncResult``; ``redis.asyncio`` is imported only when one is built.
- ``SQLiteResultBackend`` (``serve_queue.adapters.sqlite``): the embedded one.
- ``MemoryResultBackend``: in-process, for tests; ``NullResultBackend``: results off.

``open_result_backend(url)`` picks one from the URL scheme. The meta builders
(``success_meta``, ``failure_meta``, ...) and ``exception_from_meta`` live in
``serve_queue.results.meta`` and are re-exported here.
"""

from __future__ import annotations

import importlib
from typing import Any

from serve_queue.adapters import require_extra
from serve_queue.config import BrokerURL
from serve_queue.errors import ConfigurationError, MissingDependency
from serve_queue.results.local import MemoryResultBackend, NullResultBackend
from serve_queue.results.meta import (
    EXCEPTION_STATES,
    FAILURE,
    PENDING,
    READY_STATES,
    RETRY,
    REVOKED,
    STARTED,
    SUCCESS,
    MaxRetriesExceededError,
    decode_meta,
    encode_exception,
    encode_meta,
    exception_from_meta,
    failure_meta,
    invalid_arguments_meta,
    is_ready,
    max_retries_exceeded,
    not_registered_meta,
    reject_meta,
    retry_meta,
    revoked_meta,
    soft_time_limit_meta,
    started_meta,
    success_meta,
    time_limit_meta,
)
from serve_queue.results.redis import RedisResultBackend
from serve_queue.types import ResultBackend

__all__ = [
    "EXCEPTION_STATES",
    "FAILURE",
    "PENDING",
    "READY_STATES",
    "RESULT_SCHEMES",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "MaxRetriesExceededError",
    "MemoryResultBackend",
    "NullResultBackend",
    "RedisResultBackend",
    "check_result_scheme",
    "decode_meta",
    "encode_exception",
    "encode_meta",
    "exception_from_meta",
    "failure_meta",
    "invalid_arguments_meta",
    "is_ready",
    "max_retries_exceeded",
    "not_registered_meta",
    "open_result_backend",
    "reject_meta",
    "retry_meta",
    "revoked_meta",
    "soft_time_limit_meta",
    "started_meta",
    "success_meta",
    "time_limit_meta",
]

#: scheme -> (module, class name, pip extra providing its client); ``None``: not available yet
RESULT_SCHEMES: dict[str, tuple[str, str, str | None] | None] = {
    "redis": ("serve_queue.results.redis", "RedisResultBackend", "redis"),
    "rediss": ("serve_queue.results.redis", "RedisResultBackend", "redis"),
    "sqlite": ("serve_queue.adapters.sqlite", "SQLiteResultBackend", None),
    "memory": ("serve_queue.results.local", "MemoryResultBackend", None),
    # rpc:// names no server: it rides on the AMQP broker's connection, so
    # TaskQueue.open_results builds it from the broker URL (RPCResultBackend)
    "rpc": None,
}


def check_result_scheme(scheme: str) -> None:
    """Raise now what ``open_result_backend`` would raise for ``scheme``, importing nothing:
    ``ConfigurationError`` for a scheme no backend serves, ``MissingDependency`` when the
    backend's client is not installed. (``rpc://`` is checked against the broker by
    ``TaskQueue``: it needs an AMQP one.)"""
    if scheme not in RESULT_SCHEMES:
        known = ", ".join(sorted([*RESULT_SCHEMES, "none"]))
        raise ConfigurationError(
            f"unknown result backend scheme {scheme!r} (supported: {known}; Celery's other "
            "backends, e.g. database, mongodb or s3, have no serve_queue equivalent yet)"
        )
    entry = RESULT_SCHEMES[scheme]
    if entry is not None and entry[2] is not None:
        require_extra(entry[2])


def _backend_class(scheme: str) -> type[Any]:
    check_result_scheme(scheme)
    entry = RESULT_SCHEMES[scheme]
    if entry is None:
        raise ConfigurationError(
            f"{scheme}:// results travel over the AMQP broker's connection: use "
            f"TaskQueue('amqp://...', results='rpc://'), or RPCResultBackend(amqp_url)"
        )
    module_name, class_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None or (exc.name or "").startswith("serve_queue"):
            raise
        raise MissingDependency(exc.name or extra, extra) from exc
    cls: type[Any] = getattr(module, class_name)
    return cls


def open_result_backend(url: str | BrokerURL | None, **options: Any) -> ResultBackend:
    """A new, not yet connected result backend for ``url``; ``options`` go to its constructor.

    ``redis://``/``rediss://`` Celery's Redis format, ``sqlite:///path`` the embedded store,
    ``memory://`` in-process, ``None`` or ``"none"`` no results (``NullResultBackend``).
    """
    if url is None or (isinstance(url, str) and url.strip().lower() in ("", "none")):
        return NullResultBackend()
    parsed = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
    if parsed.scheme == "none":
        return NullResultBackend()
    cls = _backend_class(parsed.scheme)
    if cls is MemoryResultBackend:
        backend: ResultBackend = MemoryResultBackend(**options)
        return backend
    backend = cls(parsed, **options)
    return backend
