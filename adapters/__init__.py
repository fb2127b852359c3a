"""Broker adapters, one module per broker, loaded lazily from a scheme table.

``import serve_queue`` imports no broker client: ``open_adapter("redis://...")`` imports
``serve_queue.adapters.redis`` (and so ``redis.asyncio``) only when a Redis URL is used. A
missing client library raises ``MissingDependency`` naming the pip extra to install.
``check_scheme`` says the same things without importing anything, so ``TaskQueue`` refuses a
URL it could never serve when it is built, not at first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from serve_queue.config import BrokerURL
from serve_queue.errors import ConfigurationError, MissingDependency
from serve_queue.types import BrokerAdapter

__all__ = ["SCHEMES", "adapter_class", "check_scheme", "open_adapter", "require_extra"]

#: scheme -> (module under serve_queue.adapters, class name, pip extra that provides the client)
SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "redis": ("redis", "RedisAdapter", "redis"),
    "rediss": ("redis", "RedisAdapter", "redis"),
    "amqp": ("rabbitmq", "RabbitMQAdapter", "rabbitmq"),
    "amqps": ("rabbitmq", "RabbitMQAdapter", "rabbitmq"),
    "pyamqp": ("rabbitmq", "RabbitMQAdapter", "rabbitmq"),
    "sqlite": ("sqlite", "SQLiteAdapter", None),
    "memory": ("memory", "MemoryAdapter", None),
}

#: pip extra -> the top-level module its client installs (what ``require_extra`` looks for)
EXTRA_MODULES: dict[str, str] = {"redis": "redis", "rabbitmq": "aio_pika"}

#: brokers the design has room for but that have no adapter yet
NOT_YET = {
    "sqs": "there is no SQS adapter yet",
    "kombu": "there is no generic kombu-transport adapter yet",
}


def _supported() -> str:
    return ", ".join(sorted(SCHEMES))


def check_scheme(scheme: str) -> None:
    """Raise now what ``open_adapter`` would raise for ``scheme``, without importing it:
    ``ConfigurationError`` for a scheme no adapter serves (saying so honestly for the ones
    that are planned), ``MissingDependency`` when the adapter's client is not installed."""
    entry = SCHEMES.get(scheme)
    if entry is None:
        planned = NOT_YET.get(scheme.split("+", 1)[0])
        if planned is not None:
            raise ConfigurationError(
                f"broker scheme {scheme!r} is not supported: {planned} (supported: {_supported()})"
            )
        raise ConfigurationError(f"unknown broker scheme {scheme!r} (supported: {_supported()})")
    if entry[2] is not None:
        require_extra(entry[2])


def require_extra(extra: str) -> None:
    """Raise ``MissingDependency`` if the client library of pip extra ``extra`` is missing."""
    module = EXTRA_MODULES.get(extra, extra)
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependency(module, extra)


def adapter_class(scheme: str) -> type[BrokerAdapter]:
    """The adapter class for a URL scheme, importing its module (and client) on demand."""
    if scheme not in SCHEMES:
        check_scheme(scheme)  # raises, saying why
    module_name, class_name, extra = SCHEMES[scheme]
    try:
        module = importlib.import_module(f"serve_queue.adapters.{module_name}")
    except ModuleNotFoundError as exc:
        if extra is None or (exc.name or "").startswith("serve_queue"):
            raise
        raise MissingDependency(exc.name or module_name, extra) from exc
    cls: type[BrokerAdapter] = getattr(module, class_name)
    return cls


def open_adapter(url: str | BrokerURL, **options: Any) -> BrokerAdapter:
    """A new, not yet connected adapter for ``url``; ``options`` go to its constructor."""
    parsed = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
    return adapter_class(parsed.scheme)(parsed, **options)  # type: ignore[call-arg]
