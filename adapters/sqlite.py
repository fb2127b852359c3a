"""The embedded broker and result store: one SQLite file, no server.

Several processes on one machine (Ray Serve replicas, the API process, a CLI) may share the
file: SQLite's WAL mode lets readers and one writer work at once, and every claim, settle and
publish is a short ``BEGIN IMMEDIATE`` transaction. WAL needs a local file system (not NFS).

URLs: ``sqlite:///abs/path.db`` and ``sqlite:////abs/path.db`` both name the absolute path
``/abs/path.db``; the path may be percent-encoded (``%20`` for a space). Relative paths, a host
(``sqlite://host/x.db``), ``:memory:`` and query options are rejected, so that every process
given the same URL opens the same file. The same URL serves ``SQLiteAdapter`` and
``SQLiteResultBackend``. ``default_url()`` is the database used when no URL is given.

Semantics: higher ``priority`` (0-9) is delivered first, as in AMQP; equal priorities go in
order of readiness. A message is leased for ``visibility_timeout`` seconds when delivered; if
its consumer dies, the lease expires and the message is delivered again, marked redelivered.
Dead-lettered messages are kept with their reason in a ``dead_letters`` table under the
dead-letter queue's name (not a queue one can consume); ``SQLiteAdapter.dead_letters`` reads
them. The AMQP ``expiration`` property is stored but not enforced.

Durability: WAL with ``synchronous=NORMAL``. A committed publish or settle survives any process
being killed; a power loss or OS crash may undo the last transactions before it, never
corrupting the file (an undone settle means a redelivery, an undone publish is lost).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from serve_queue.adapters._sqlite_rows import (
    DeadLetteredMessage,
    Lease,
    Stream,
    dead_lettered,
    decode_mapping,
    delivery,
    encode_json,
    new_message,
)
from serve_queue.adapters._sqlite_schema import MessageRow, Store
from serve_queue.adapters._sqlite_worker import DatabaseThread, ReadyWatch, nap
from serve_queue.config import BrokerURL
from serve_queue.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    ResultBackendError,
    TaskTimeout,
)
from serve_queue.types import (
    Ack,
    DeadLetter,
    Delivery,
    Outcome,
    OutgoingMessage,
    QueueDepth,
    Requeue,
    queue_list,
)

__all__ = [
    "ENV_VAR",
    "DeadLetteredMessage",
    "SQLiteAdapter",
    "SQLiteResultBackend",
    "database_path",
    "default_url",
]

logger = logging.getLogger(__name__)

#: environment variable naming the database file used when no URL is given
ENV_VAR = "SERVE_QUEUE_DB"
_FAST_POLL_S = 0.005
_READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def default_url() -> str:
    """``sqlite:///<path>`` of the default database, creating its directory.

    The path is ``$SERVE_QUEUE_DB`` if set (absolute, ``~`` expanded), else
    ``$XDG_CACHE_HOME/serve_queue/serve_queue.db`` (``~/.cache/...`` when unset): stable per
    user, so separate processes agree on it without configuration.
    """
    raw = os.environ.get(ENV_VAR)
    if raw:
        path = Path(raw).expanduser()
        if not path.is_absolute():
            raise ConfigurationError(f"{ENV_VAR} must be an absolute path, not {raw!r}")
    else:
        cache = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
        path = base / "serve_queue" / "serve_queue.db"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create directory {path.parent}: {exc}") from exc
    return "sqlite://" + quote(str(path))


def database_path(url: str | BrokerURL) -> str:
    """The absolute file path an ``sqlite://`` URL names (see the module docstring)."""
    parsed = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
    if parsed.scheme != "sqlite":
        raise ConfigurationError(f"not an sqlite URL: {parsed}")
    if parsed.host or parsed.port or parsed.username or parsed.password:
        raise ConfigurationError(
            f"sqlite URL {parsed} names a host; use sqlite:///absolute/path.db"
        )
    if parsed.query:
        raise ConfigurationError(f"sqlite URL {parsed} takes no query options")
    path = unquote(parsed.path)
    name = path.lstrip("/")
    if not path.startswith("/") or not name or name == ":memory:":
        raise ConfigurationError(
            f"sqlite URL {parsed} needs an absolute file path: sqlite:///absolute/path.db"
        )
    return os.path.normpath("/" + name)


def _lease_of(delivery: Delivery) -> Lease:
    if not isinstance(delivery.token, Lease):
        raise BrokerError("this delivery did not come from an SQLiteAdapter")
    return delivery.token


class SQLiteAdapter:
    """``BrokerAdapter`` on an SQLite file (see the module docstring).

    ``poll_interval``: the longest wait between polls when idle (polling restarts at 5 ms after
    any activity, and a publish through this same instance wakes its consumers at once).
    ``busy_timeout``: how long to wait for another process's write lock before failing with
    ``BrokerUnavailable``.
    """

    def __init__(
        self,
        url: str | BrokerURL,
        *,
        visibility_timeout: float = 60.0,
        dead_letter_queue: str = "{queue}.dlq",
        poll_interval: float = 0.05,
        busy_timeout: float = 5.0,
    ) -> None:
        if visibility_timeout <= 0 or poll_interval <= 0 or busy_timeout < 0:
            raise ConfigurationError(
                "visibility_timeout and poll_interval must be positive, busy_timeout >= 0"
            )
        try:
            dead_letter_queue.format(queue="q")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(f"bad dead_letter_queue {dead_letter_queue!r}") from exc
        self.path = database_path(url)
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self._dead_letter_queue = dead_letter_queue
        self._db = DatabaseThread(
            self.path, busy_timeout=busy_timeout, unavailable=BrokerUnavailable, failure=BrokerError
        )
        self._prefix = uuid.uuid4().hex[:12]
        self._streams: set[Stream] = set()
        self._background: set[asyncio.Future[None]] = set()
        self._connected = False
        self._closed = False

    def __repr__(self) -> str:
        return f"SQLiteAdapter({self.path!r})"

    def dead_letter_queue(self, queue: str) -> str:
        """The name dead letters from ``queue`` are kept under."""
        return self._dead_letter_queue.format(queue=queue)

    async def connect(self) -> None:
        if self._closed:
            raise BrokerError("SQLiteAdapter is closed")
        if not self._connected:
            await self._db.start()
            self._connected = True

    async def close(self) -> None:
        """Stop fetching; hand every unsettled delivery back to the queue at once."""
        if self._closed:
            return
        self._closed = True
        self._wake_streams()
        if self._connected:
            await self._db.stop(final=Store.release_all)

    async def publish(self, queue: str, message: OutgoingMessage) -> None:
        self._check_open()
        if not queue:
            raise ConfigurationError("queue name must not be empty")
        row = new_message(queue, message)
        await self._db.batched(lambda store: store.insert(row))
        self._wake_streams()

    async def deliveries(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        """Yield deliveries from ``queues``; at most ``prefetch`` unsettled at any time."""
        names = queue_list(queues)
        if prefetch < 1 or not names:
            raise ConfigurationError("deliveries() needs queue names and prefetch >= 1")
        self._check_open()
        stream = Stream(prefetch)
        self._streams.add(stream)
        pending: deque[Delivery] = deque()
        try:
            while not self._closed:
                pending.extend(await self._next_batch(stream, names))
                while pending and not self._closed:
                    yield pending.popleft()
        finally:
            self._streams.discard(stream)
            if pending and not self._closed:  # claimed but never handed out: give them back
                await self._hand_back(stream, [_lease_of(d) for d in pending])

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        lease = _lease_of(delivery)
        op = self._settle_op(delivery.queue, lease, outcome)
        first = None if self._closed else lease.stream.begin_settle(lease.token)
        if first is None:
            return  # handed back by close(), or being settled right now
        try:
            matched = await self._db.batched(op)
        finally:
            lease.stream.release(lease.token)
        if first and not matched:  # a repeated settle finding nothing is expected
            logger.warning(
                "%s of message %d on %r did nothing: its lease had expired and it was "
                "delivered again (renew long tasks with extend())",
                type(outcome).__name__,
                lease.msg_id,
                delivery.queue,
            )
        if isinstance(outcome, Requeue) and outcome.delay_s <= 0:
            self._wake_streams()

    def _settle_op(self, queue: str, lease: Lease, outcome: Outcome) -> Callable[[Store], bool]:
        msg_id, token = lease.msg_id, lease.token
        if isinstance(outcome, Ack):
            return lambda s: s.ack(msg_id, token)
        if isinstance(outcome, Requeue):
            delay = outcome.delay_s
            return lambda s: s.requeue(msg_id, token, delay)
        if isinstance(outcome, DeadLetter):
            dlq, reason = self.dead_letter_queue(queue), outcome.reason
            return lambda s: s.dead_letter(msg_id, token, reason, dlq)
        raise TypeError(f"unknown outcome {outcome!r}")

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        lease = _lease_of(delivery)
        if not self._closed:
            await self._db.batched(lambda s: s.extend(lease.msg_id, lease.token, seconds))

    async def depth(self, queue: str) -> QueueDepth:
        self._check_open()
        return await self._db.call(lambda s: s.depth(queue))

    async def dead_letters(self, queue: str, limit: int = 1000) -> list[DeadLetteredMessage]:
        """Messages dead-lettered from ``queue`` (kept under ``dead_letter_queue(queue)``)."""
        self._check_open()
        name = self.dead_letter_queue(queue)
        rows = await self._db.call(lambda s: s.dead_letters(name, limit))
        return [dead_lettered(row) for row in rows]

    async def _hand_back(self, stream: Stream, leases: list[Lease]) -> None:
        stream.held.difference_update(lease.token for lease in leases)
        pairs = [(lease.msg_id, lease.token) for lease in leases]
        try:
            await self._db.call(lambda s: s.release(pairs))
        except BrokerError as exc:  # they come back when their lease expires
            logger.warning("could not hand back %d messages at once: %s", len(pairs), exc)

    async def _next_batch(self, stream: Stream, queues: list[str]) -> list[Delivery]:
        """Poll until some messages are claimed (or the adapter closes)."""
        interval = _FAST_POLL_S
        while not self._closed:
            stream.changed.clear()
            room = stream.room()
            if room <= 0:
                await stream.changed.wait()
                continue
            batch = await self._claim(stream, queues, room)
            if batch or self._closed:
                return batch
            await nap(stream.changed, interval)
            interval = min(interval * 2, self.poll_interval)
        return []

    async def _claim(self, stream: Stream, queues: list[str], limit: int) -> list[Delivery]:
        lease_s, prefix = self.visibility_timeout, self._prefix
        # submitted now, before any close() that follows can queue its hand-back
        claim = self._db.call(lambda s: s.claim(queues, limit, lease_s, prefix))
        try:
            rows = await asyncio.shield(claim)
        except asyncio.CancelledError:  # the claim still lands: give its messages back
            claim.add_done_callback(self._release_orphans)
            raise
        stream.held.update(row.token for row in rows)
        return [delivery(row, stream) for row in rows]

    def _release_orphans(self, task: asyncio.Future[list[MessageRow]]) -> None:
        if task.cancelled() or task.exception() is not None or self._closed:
            return
        leases = [(row.id, row.token) for row in task.result()]
        if leases:
            release = self._db.call(lambda s: s.release(leases))
            self._background.add(release)
            release.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not hand back messages: %s", task.exception())

    def _wake_streams(self) -> None:
        for stream in self._streams:
            stream.changed.set()

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError("SQLiteAdapter is closed")
        if not self._connected:
            raise BrokerError("SQLiteAdapter is not connected; await connect() first")


class SQLiteResultBackend:
    """``ResultBackend`` on an SQLite file, Celery's task meta stored as kombu JSON.

    kombu's JSON keeps datetime, date, time, Decimal, UUID and bytes values intact. A stored
    SUCCESS is never overwritten. Results expire ``result_ttl`` seconds after their last store
    (``None``: never); expired results read as absent and are purged now and then.
    """

    def __init__(
        self,
        url: str | BrokerURL,
        *,
        result_ttl: float | None = 86400.0,
        poll_interval: float = 0.05,
        busy_timeout: float = 5.0,
    ) -> None:
        if (result_ttl is not None and result_ttl <= 0) or poll_interval <= 0:
            raise ConfigurationError("result_ttl and poll_interval must be positive")
        self.path = database_path(url)
        self.result_ttl = result_ttl
        self.poll_interval = poll_interval
        self._db = DatabaseThread(
            self.path,
            busy_timeout=busy_timeout,
            unavailable=ResultBackendError,
            failure=ResultBackendError,
        )
        self._watch = ReadyWatch(self._db, self._decode, poll_interval)
        self._connected = False

    def __repr__(self) -> str:
        return f"SQLiteResultBackend({self.path!r})"

    async def connect(self) -> None:
        if not self._connected:
            await self._db.start()
            self._connected = True
            try:
                await self._db.call(Store.purge_results)
            except ResultBackendError as exc:  # best effort: expired rows read as absent anyway
                logger.warning("could not purge expired results: %s", exc)

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self._db.stop()

    async def store(
        self, task_id: str, meta: Mapping[str, Any], *, reply_to: str | None = None
    ) -> None:
        text = encode_json(dict(meta))
        status = meta.get("status")
        state = status if isinstance(status, str) else None
        ttl = self.result_ttl
        await self._db.batched(lambda s: s.store_result(task_id, state, text, ttl))
        self._watch.poke()

    async def get(self, task_id: str) -> dict[str, Any] | None:
        text = await self._db.call(lambda s: s.get_result(task_id))
        return None if text is None else self._decode(task_id, text)

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        meta = await self.get(task_id)
        if meta is not None and meta.get("status") in _READY_STATES:
            return meta
        late = TaskTimeout(f"task {task_id} was not ready within {timeout}s")
        if timeout is not None and timeout <= 0:
            raise late
        try:
            return await self._watch.wait(task_id, timeout)
        except asyncio.TimeoutError:
            raise late from None

    def _decode(self, task_id: str, text: str) -> dict[str, Any]:
        try:
            return decode_mapping(text)
        except (TypeError, ValueError) as exc:
            raise ResultBackendError(f"stored meta of task {task_id} is unreadable") from exc
