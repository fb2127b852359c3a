"""The SQL behind ``serve_queue.adapters.sqlite``: schema, pragmas, and every statement.

``Store`` owns one ``sqlite3`` connection and is used from one thread only (the adapter's
dedicated database thread). Every write runs in a ``BEGIN IMMEDIATE`` transaction, so a writer
takes SQLite's write lock before it reads what it is about to change: two processes claiming
from the same queue can never lease the same row. Times are wall-clock seconds
(``time.time()``), because leases and delays are compared across processes on one machine.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A committed transaction
survives the death of any process (it is in the WAL before ``COMMIT`` returns); a power loss or
OS crash may roll back the last transactions committed before it, never corrupting the file.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from serve_queue.errors import ConfigurationError
from serve_queue.types import QueueDepth

__all__ = ["SCHEMA_VERSION", "DeadLetterRow", "MessageRow", "NewMessage", "Store"]

SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        body BLOB NOT NULL,
        content_type TEXT NOT NULL,
        content_encoding TEXT NOT NULL,
        headers TEXT NOT NULL DEFAULT '{}',
        properties TEXT NOT NULL DEFAULT '{}',
        enqueued_at REAL NOT NULL,
        ready_at REAL NOT NULL,
        lease_token TEXT,
        lease_until REAL,
        redelivered INTEGER NOT NULL DEFAULT 0,
        delivery_count INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS messages_claim ON messages (queue, priority DESC, ready_at)",
    "CREATE INDEX IF NOT EXISTS messages_due ON messages (queue, ready_at)",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        source_queue TEXT NOT NULL,
        reason TEXT NOT NULL,
        dead_lettered_at REAL NOT NULL,
        priority INTEGER NOT NULL,
        body BLOB NOT NULL,
        content_type TEXT NOT NULL,
        content_encoding TEXT NOT NULL,
        headers TEXT NOT NULL,
        properties TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        delivery_count INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, id)",
    """CREATE TABLE IF NOT EXISTS results (
        task_id TEXT PRIMARY KEY,
        status TEXT,
        meta TEXT NOT NULL,
        expires_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS results_expiry ON results (expires_at)",
)

# "ready": due, and not held under an unexpired lease (an expired lease is redelivered)
_READY = "ready_at <= :now AND (lease_token IS NULL OR lease_until < :now)"
_RESERVED = "lease_token IS NOT NULL AND lease_until >= :now"
_DELAYED = "ready_at > :now AND (lease_token IS NULL OR lease_until < :now)"
_MESSAGE_COLUMNS = (
    "priority, body, content_type, content_encoding, headers, properties, enqueued_at, "
    "delivery_count"
)
_RESULT_PURGE_EVERY_S = 300.0
_READY_STATES = "('SUCCESS', 'FAILURE', 'REVOKED')"


class NewMessage(NamedTuple):
    """A message to insert; headers and properties are already JSON text."""

    queue: str
    priority: int
    body: bytes
    content_type: str
    content_encoding: str
    headers: str
    properties: str
    delay_s: float = 0.0


class MessageRow(NamedTuple):
    """A message just leased by ``Store.claim``; ``delivery_count`` counts earlier leases."""

    id: int
    queue: str
    priority: int
    body: bytes
    content_type: str
    content_encoding: str
    headers: str
    properties: str
    delivery_count: int
    token: str


class DeadLetterRow(NamedTuple):
    """One dead-lettered message with the reason, as stored."""

    queue: str
    source_queue: str
    reason: str
    dead_lettered_at: float
    priority: int
    body: bytes
    content_type: str
    content_encoding: str
    headers: str
    properties: str
    enqueued_at: float
    delivery_count: int


class Store:
    """One connection and everything done with it. Not thread-safe: one thread only.

    ``leases`` remembers the rows this store leased and has not settled (id -> lease token), so
    ``release_all`` can hand them back at once when the adapter closes.
    """

    def __init__(self, path: str, *, busy_timeout: float) -> None:
        self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        self.leases: dict[int, str] = {}
        self._serial = itertools.count(1)
        self._next_purge = 0.0
        self._settled: list[int] = []  # leases settled in the running batch
        try:
            self._configure(busy_timeout)
        except BaseException:
            self.conn.close()
            raise

    def _configure(self, busy_timeout: float) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {max(int(busy_timeout * 1000), 0)}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"database schema version {version} is newer than this serve_queue "
                    f"understands ({SCHEMA_VERSION})"
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: the write lock is taken first (waiting up to busy_timeout)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def run_batch(self, ops: Sequence[Callable[[Store], Any]]) -> list[Any]:
        """Run many writes in one transaction; all of them commit or none does."""
        self._settled.clear()
        with self.transaction():
            results = [op(self) for op in ops]
        for msg_id in self._settled:
            self.leases.pop(msg_id, None)
        self._settled.clear()
        return results

    # -- broker ---------------------------------------------------------------------------

    def insert(self, message: NewMessage) -> None:
        now = time.time()
        self.conn.execute(
            "INSERT INTO messages (queue, priority, body, content_type, content_encoding, "
            "headers, properties, enqueued_at, ready_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*message[:7], now, now + max(message.delay_s, 0.0)),
        )

    def claim(
        self, queues: Sequence[str], limit: int, lease_s: float, prefix: str
    ) -> list[MessageRow]:
        """Lease up to ``limit`` ready messages, highest priority first, then oldest."""
        marks = ", ".join("?" * len(queues))
        where = f"queue IN ({marks}) AND " + _READY.replace(":now", "?")
        now = time.time()
        probe = self.conn.execute(
            f"SELECT 1 FROM messages INDEXED BY messages_due WHERE {where} LIMIT 1",
            (*queues, now, now),
        ).fetchall()
        if not probe:  # nothing due: skip the write lock (and parked messages are not scanned)
            return []
        with self.transaction() as conn:
            now = time.time()
            rows = conn.execute(
                "SELECT id, queue, priority, body, content_type, content_encoding, headers, "
                f"properties, delivery_count FROM messages WHERE {where} "
                "ORDER BY priority DESC, ready_at, id LIMIT ?",
                (*queues, now, now, limit),
            ).fetchall()
            claimed = [MessageRow._make((*row, f"{prefix}.{next(self._serial)}")) for row in rows]
            conn.executemany(
                "UPDATE messages SET lease_token = ?, lease_until = ?, "
                "redelivered = delivery_count > 0, delivery_count = delivery_count + 1 "
                "WHERE id = ?",
                [(row.token, now + lease_s, row.id) for row in claimed],
            )
        self.leases.update((row.id, row.token) for row in claimed)
        return claimed

    def ack(self, msg_id: int, token: str) -> bool:
        self._settled.append(msg_id)
        cursor = self.conn.execute(
            "DELETE FROM messages WHERE id = ? AND lease_token = ?", (msg_id, token)
        )
        return cursor.rowcount == 1

    def requeue(self, msg_id: int, token: str, delay_s: float) -> bool:
        """Release the lease; a positive delay parks the message until ``now + delay_s``."""
        self._settled.append(msg_id)
        ready_at = "ready_at" if delay_s <= 0 else "?"
        params: tuple[Any, ...] = (
            (msg_id, token) if delay_s <= 0 else (time.time() + delay_s, msg_id, token)
        )
        cursor = self.conn.execute(
            f"UPDATE messages SET lease_token = NULL, lease_until = NULL, ready_at = {ready_at} "
            "WHERE id = ? AND lease_token = ?",
            params,
        )
        return cursor.rowcount == 1

    def dead_letter(self, msg_id: int, token: str, reason: str, dead_letter_queue: str) -> bool:
        """Move the message, with its original bytes, into ``dead_letters``."""
        self._settled.append(msg_id)
        cursor = self.conn.execute(
            "INSERT INTO dead_letters (queue, source_queue, reason, dead_lettered_at, "
            f"{_MESSAGE_COLUMNS}) SELECT ?, queue, ?, ?, {_MESSAGE_COLUMNS} FROM messages "
            "WHERE id = ? AND lease_token = ?",
            (dead_letter_queue, reason, time.time(), msg_id, token),
        )
        if cursor.rowcount != 1:
            return False
        self.conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,))
        return True

    def extend(self, msg_id: int, token: str, seconds: float) -> bool:
        cursor = self.conn.execute(
            "UPDATE messages SET lease_until = ? WHERE id = ? AND lease_token = ?",
            (time.time() + seconds, msg_id, token),
        )
        return cursor.rowcount == 1

    def release(self, leases: Sequence[tuple[int, str]]) -> None:
        """Hand leased messages back at once, keeping their place at the front of the queue."""
        if not leases:
            return
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE messages SET lease_token = NULL, lease_until = NULL "
                "WHERE id = ? AND lease_token = ?",
                leases,
            )
        for msg_id, _ in leases:
            self.leases.pop(msg_id, None)

    def release_all(self) -> None:
        self.release(list(self.leases.items()))

    def depth(self, queue: str) -> QueueDepth:
        now = time.time()
        ready, reserved, delayed, oldest = self.conn.execute(
            f"SELECT COALESCE(SUM({_READY}), 0), COALESCE(SUM({_RESERVED}), 0), "
            f"COALESCE(SUM({_DELAYED}), 0), MIN(CASE WHEN {_READY} THEN enqueued_at END) "
            "FROM messages WHERE queue = :queue",
            {"now": now, "queue": queue},
        ).fetchone()
        age = None if oldest is None else max(now - oldest, 0.0)
        return QueueDepth(ready=ready, reserved=reserved, delayed=delayed, oldest_age_s=age)

    def dead_letters(self, queue: str, limit: int) -> list[DeadLetterRow]:
        rows = self.conn.execute(
            "SELECT queue, source_queue, reason, dead_lettered_at, "
            f"{_MESSAGE_COLUMNS} FROM dead_letters WHERE queue = ? ORDER BY id LIMIT ?",
            (queue, limit),
        ).fetchall()
        return [DeadLetterRow(*row) for row in rows]

    # -- results --------------------------------------------------------------------------

    def store_result(self, task_id: str, status: str | None, meta: str, ttl: float | None) -> bool:
        """Upsert a task's meta unless a live SUCCESS is stored; True if it was written."""
        now = time.time()
        cursor = self.conn.execute(
            "INSERT INTO results (task_id, status, meta, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, "
            "meta = excluded.meta, expires_at = excluded.expires_at "
            "WHERE results.status IS NOT 'SUCCESS' OR results.expires_at <= ?",
            (task_id, status, meta, None if ttl is None else now + ttl, now),
        )
        if now >= self._next_purge:
            self.purge_results()
        return cursor.rowcount == 1

    def get_result(self, task_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT meta FROM results WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)",
            (task_id, time.time()),
        ).fetchone()
        return None if row is None else str(row[0])

    def ready_results(self, task_ids: Sequence[str]) -> list[tuple[str, str]]:
        """``(task_id, meta)`` of those of ``task_ids`` whose live result is ready."""
        now, found = time.time(), []
        for start in range(0, len(task_ids), 500):
            chunk = task_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            found += self.conn.execute(
                f"SELECT task_id, meta FROM results WHERE task_id IN ({marks}) "
                f"AND status IN {_READY_STATES} AND (expires_at IS NULL OR expires_at > ?)",
                (*chunk, now),
            ).fetchall()
        return found

    def purge_results(self) -> int:
        """Delete expired results (they already read as absent); the count deleted."""
        now = time.time()
        self._next_purge = now + _RESULT_PURGE_EVERY_S
        cursor = self.conn.execute("DELETE FROM results WHERE expires_at <= ?", (now,))
        return cursor.rowcount
