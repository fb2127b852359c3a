"""Broker adapters, one module per broker, loaded lazily from a scheme table.

``import serve_queue`` imports no broker client: ``open_adapter("redis://...")`` imports
``serve_queue.adapters.redis`` (and so ``redis.asyncio``) only when a Redis URL is used. A
missing client library raises ``MissingDependency`` naming the pip extra to install.
"""

from __future__ import annotations

import importlib
from typing import Any

from serve_queue.config import BrokerURL
from serve_queue.errors import ConfigurationError, MissingDependency
from serve_queue.types import BrokerAdapter

__all__ = ["SCHEMES", "open_adapter"]

#: scheme -> (module under serve_queue.adapters, class name, pip extra that provides the client)
#: (sqs:// and a generic kombu adapter are designed but not written yet)
SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "redis": ("redis", "RedisAdapter", "redis"),
    "rediss": ("redis", "RedisAdapter", "redis"),
    "amqp": ("rabbitmq", "RabbitMQAdapter", "rabbitmq"),
    "amqps": ("rabbitmq", "RabbitMQAdapter", "rabbitmq"),
    "pyamqp": ("rabbitmq", "RabbitMQAdapter", "rabbitmq"),
    "sqlite": ("sqlite", "SQLiteAdapter", None),
    "memory": ("memory", "MemoryAdapter", None),
}


def adapter_class(scheme: str) -> type[BrokerAdapter]:
    """The adapter class for a URL scheme, importing its module (and client) on demand."""
    try:
        module_name, class_name, extra = SCHEMES[scheme]
    except KeyError:
        known = ", ".join(sorted(SCHEMES))
        raise ConfigurationError(f"unknown broker scheme {scheme!r} (known: {known})") from None
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
