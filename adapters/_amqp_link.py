"""One AMQP connection that comes back after a loss: reconnect with backoff, channels on demand.

``AMQPLink`` owns the aio-pika connection. Every new connection gets a new ``generation``
number and an empty declaration cache (RabbitMQ may have lost non-durable topology, and a
redeclare is cheap once per connection). Client exceptions are translated here, at the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Hashable, Iterator
from urllib.parse import unquote

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import AbstractChannel as RawChannel

from serve_queue.config import BrokerURL
from serve_queue.errors import BrokerError, BrokerUnavailable, ConfigurationError

__all__ = ["QUIET", "RETRYABLE", "AMQPLink", "amqp_url", "retry_delay", "translated"]

log = logging.getLogger("serve_queue.adapters.rabbitmq")

#: client errors after which a reconnect (or a new channel) may succeed
RETRYABLE: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
#: every client error (for cleanup paths that must not raise)
QUIET: tuple[type[BaseException], ...] = (*RETRYABLE, aiormq.exceptions.AMQPError)
_SCHEMES = {"amqp": "amqp", "pyamqp": "amqp", "amqps": "amqps", "rpc": "amqp"}
_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0)


def amqp_url(url: str | BrokerURL) -> BrokerURL:
    """``url`` as an ``amqp://``/``amqps://`` URL aio-pika understands (``pyamqp://`` too)."""
    parsed = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
    scheme = _SCHEMES.get(parsed.scheme)
    if scheme is None:
        raise ConfigurationError(f"not an AMQP URL: {parsed}")
    if not parsed.host:
        hint = " (rpc:// results travel on the broker: give the broker's amqp:// URL)"
        raise ConfigurationError(f"AMQP URL without a host: {parsed}{hint}")
    return parsed.model_copy(update={"scheme": scheme})


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn aio-pika/aiormq errors raised inside into ``serve_queue.errors``."""
    try:
        yield
    except RETRYABLE as exc:
        raise BrokerUnavailable(f"{what}: connection lost: {_describe(exc)}") from exc
    except aiormq.exceptions.AMQPError as exc:
        raise BrokerError(f"{what}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AMQPLink:
    """A connection to one RabbitMQ vhost that is re-established on demand."""

    def __init__(self, url: str | BrokerURL, *, connect_timeout: float, reconnect_window: float):
        self.url = amqp_url(url)
        self.vhost = unquote(self.url.path) or "/"
        self.connect_timeout = connect_timeout
        self.reconnect_window = reconnect_window
        self.generation = 0
        self.declared: set[Hashable] = set()
        self.closed = False
        self._conn: AbstractConnection | None = None
        self._channels: dict[str, tuple[AbstractChannel, RawChannel]] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"AMQPLink({str(self.url)!r}, generation={self.generation})"

    @property
    def connected(self) -> bool:
        return self._conn is not None and _alive(self._conn)

    async def connection(self, *, patient: bool = True) -> AbstractConnection:
        """The live connection, reconnecting if needed: retried with backoff for up to
        ``reconnect_window`` seconds when ``patient``, else one attempt."""
        if self._conn is not None and _alive(self._conn):
            return self._conn
        async with self._lock:
            if self._conn is not None and _alive(self._conn):
                return self._conn
            deadline = time.monotonic() + (self.reconnect_window if patient else 0.0)
            attempt = 0
            while True:
                if self.closed:
                    raise BrokerUnavailable(f"{self.url}: the adapter is closed")
                try:
                    conn = await aio_pika.connect(
                        self.url.render(reveal=True), timeout=self.connect_timeout
                    )
                except aiormq.exceptions.ProbableAuthenticationError as exc:
                    raise BrokerUnavailable(f"{self.url}: login refused: {exc}") from exc
                except QUIET as exc:
                    delay = retry_delay(attempt)
                    if time.monotonic() + delay > deadline:
                        why = _describe(exc)
                        raise BrokerUnavailable(f"cannot connect to {self.url}: {why}") from exc
                    if attempt == 0:
                        log.warning("cannot connect to %s (%s), retrying", self.url, _describe(exc))
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                return self._connected(conn)

    def _connected(self, conn: AbstractConnection) -> AbstractConnection:
        if self.generation:
            log.warning("reconnected to %s (connection #%d)", self.url, self.generation + 1)
        self._conn = conn
        self.generation += 1
        self.declared.clear()
        self._channels.clear()
        return conn

    async def open_channel(self, *, confirms: bool) -> tuple[AbstractChannel, RawChannel]:
        """A new channel on the live connection (aio-pika's and the underlying aiormq one)."""
        conn = await self.connection()
        try:
            with translated("open a channel"):
                channel = await conn.channel(publisher_confirms=confirms)
                return channel, await channel.get_underlay_channel()
        except RuntimeError as exc:  # aiormq: "<Connection ...> closed", not yet noticed here
            await self.reset(exc)
            raise BrokerUnavailable(f"open a channel: connection lost: {exc}") from exc

    async def channel(self, kind: str) -> RawChannel:
        """A shared channel of one ``kind`` ("confirm": publisher confirms on; "plain";
        "probe": for passive declares, which close it on 404), reopened when closed."""
        current = self._channels.get(kind)
        if current is not None and not current[1].is_closed and self.connected:
            return current[1]
        pair = await self.open_channel(confirms=kind == "confirm")
        self._channels[kind] = pair
        return pair[1]

    async def close(self) -> None:
        """Close the connection for good (the broker requeues every unacked delivery)."""
        self.closed = True
        conn, self._conn = self._conn, None
        self._channels.clear()
        if conn is not None and not conn.is_closed:
            with contextlib.suppress(*QUIET):
                await conn.close()

    async def reset(self, reason: BaseException | None = None) -> None:
        """Drop a connection that looks alive but failed (a new one is made on next use)."""
        conn, self._conn = self._conn, None
        self._channels.clear()
        if conn is not None and not conn.is_closed:
            log.warning("dropping the connection to %s: %s", self.url, reason)
            with contextlib.suppress(*QUIET):
                await conn.close()


def _alive(conn: AbstractConnection) -> bool:
    """Open, as far as aio-pika *and* the aiormq connection under it know (aio-pika learns
    of a close from a callback, a little later)."""
    transport = conn.transport
    return not conn.is_closed and transport is not None and not transport.connection.is_closed


def retry_delay(attempt: int) -> float:
    """The backoff before retry number ``attempt`` (0-based), with jitter."""
    return _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)] * random.uniform(0.8, 1.2)
