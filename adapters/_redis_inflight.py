"""In-flight bookkeeping of the Redis adapter: settle batching, hand-back and restore sweeps.

Everything here talks to Redis through one connected client and the scripts of
``serve_queue.adapters._redis_scripts``; translating client errors is the adapter's job.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from redis.asyncio import Redis

from serve_queue.adapters._redis_envelope import mark_redelivered, unacked_entry
from serve_queue.adapters._redis_scripts import (
    CLAIM,
    DEPTH,
    FETCH,
    MOVE,
    RESTORE_STAGING,
    RESTORE_STAGINGS,
    SEP,
    UNLOCK,
    RedisKeys,
    step_for,
)

__all__ = ["Batcher", "InflightStore", "Op", "Token"]

log = logging.getLogger("serve_queue.adapters.redis")

_SWEEP_BATCH = 500


@dataclass(slots=True, eq=False)
class Token:
    """Where a delivery lives on Redis: its tag, the raw list item, and the list it came from
    (``step`` = priority step; malformed items are recorded in the raw hash, not ``unacked``)."""

    tag: bytes
    raw: bytes
    queue: str
    step: int
    malformed: bool


class Op(NamedTuple):
    """One command waiting for the next pipeline flush."""

    kind: str  # ack | extend | push | move | claim
    tag: bytes = b""
    malformed: bool = False
    key: str = ""
    payload: bytes = b""
    score: float = 0.0
    mode: str = ""  # for move: L (LPUSH), R (RPUSH), Z (ZADD score); for claim: quoted queue
    base: str = ""  # for claim: the list the staged item came from (key = the staging list)


class Batcher:
    """Coalesces operations submitted during one loop tick into one ``flush`` call; every
    submitter awaits the shared outcome of the flush that carried its operation.

    A submitter that is cancelled (or times out) stops waiting at once; the flush goes on for
    the others, so its operation may still reach Redis: the caller learns only that nothing
    was confirmed."""

    def __init__(self, flush: Callable[[list[Op]], Awaitable[None]]) -> None:
        self._flush = flush
        self._ops: list[Op] = []
        self._done: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, op: Op) -> None:
        self._ops.append(op)
        done = self._done
        if done is None:
            done = self._done = asyncio.get_running_loop().create_future()
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        await asyncio.shield(done)

    def post(self, op: Op) -> None:
        """Submit ``op`` without waiting for its flush (its failure is the flush callback's
        to report)."""
        self._ops.append(op)
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def drain(self) -> None:
        """Wait until everything submitted so far was flushed."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        try:
            while self._ops:
                ops, done = self._ops, self._done
                self._ops, self._done = [], None
                assert done is not None
                try:
                    await self._flush(ops)
                except Exception as exc:
                    done.set_exception(exc)
                    done.exception()  # mark retrieved: the submitters may have gone
                else:
                    done.set_result(None)
        finally:
            self._task = None


class InflightStore:
    """The adapter's connected client, key names and registered scripts."""

    def __init__(self, client: Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self.fetch: Any = client.register_script(FETCH)
        self.move: Any = client.register_script(MOVE)
        self.claim: Any = client.register_script(CLAIM)
        self.staging: Any = client.register_script(RESTORE_STAGING)
        self.stagings: Any = client.register_script(RESTORE_STAGINGS)
        self.depth: Any = client.register_script(DEPTH)
        self.unlock: Any = client.register_script(UNLOCK)

    def record_keys(self, malformed: bool) -> tuple[str, str]:
        k = self.keys
        return (k.raw, k.raw_index) if malformed else (k.unacked, k.unacked_index)

    async def flush(self, ops: list[Op]) -> None:
        """Send buffered operations in one pipeline: acks as one HDEL + ZREM per hash, lease
        renewals as one ZADD XX, publishes as one LPUSH per list, moves as atomic scripts."""
        acks: dict[bool, list[bytes]] = {False: [], True: []}
        scores: dict[bool, dict[bytes, float]] = {False: {}, True: {}}
        pushes: dict[str, list[bytes]] = {}
        pipe = self.client.pipeline(transaction=False)
        for op in ops:
            if op.kind == "ack":
                acks[op.malformed].append(op.tag)
            elif op.kind == "extend":
                scores[op.malformed][op.tag] = op.score
            elif op.kind == "push":
                pushes.setdefault(op.key, []).append(op.payload)
            elif op.kind == "claim":
                keys = [*self.record_keys(False), *self.record_keys(True), op.key, op.base]
                claim = [op.tag, op.payload, repr(op.score), op.mode, "1" if op.malformed else "0"]
                await self.claim(keys=keys, args=claim, client=pipe)
            else:
                keys = [*self.record_keys(op.malformed), op.key]
                move = [op.tag, op.mode, op.payload, op.score, ""]
                await self.move(keys=keys, args=move, client=pipe)
        for malformed in (False, True):
            hash_key, index = self.record_keys(malformed)
            if acks[malformed]:
                pipe.hdel(hash_key, *acks[malformed])
                pipe.zrem(index, *acks[malformed])
            if scores[malformed]:
                pipe.zadd(index, scores[malformed], xx=True)
        for key, payloads in pushes.items():
            pipe.lpush(key, *payloads)
        await pipe.execute()

    async def hand_back(self, tokens: list[Token]) -> None:
        """Put deliveries still in flight back at the front of their lists, marked redelivered,
        newest first so that the oldest is the next one taken."""
        if not tokens:
            return
        pipe = self.client.pipeline(transaction=False)
        for token in reversed(tokens):
            payload = token.raw if token.malformed else mark_redelivered(token.raw)
            dest = self.keys.list_key(token.queue, token.step)
            keys = [*self.record_keys(token.malformed), dest]
            await self.move(keys=keys, args=[token.tag, "R", payload, 0, ""], client=pipe)
        await pipe.execute()

    async def register_staging(self, members: list[str], expires: float) -> None:
        """Register (or renew) staging lists until ``expires`` (unix time)."""
        if members:
            await self.client.zadd(self.keys.stagings, dict.fromkeys(members, expires))

    async def restore_staging(self, lists: list[tuple[str, str]], members: list[str]) -> int:
        """Put the items parked in ``lists`` ((staging, base list) pairs) back at the front
        of their base lists and drop the registrations ``members``."""
        if not lists:
            return 0
        pipe = self.client.pipeline(transaction=False)
        await self.staging(keys=[key for pair in lists for key in pair], client=pipe)
        if members:
            pipe.zrem(self.keys.stagings, *members)
        replies = await pipe.execute()
        return int(replies[0])

    async def restore_orphan_stagings(self) -> int:
        """Put back the items of staging lists whose owner stopped renewing them."""
        return int(await self.stagings(keys=[self.keys.stagings], args=[repr(time.time())]))

    async def sweep(self, visibility_timeout: float) -> int:
        """kombu's restore: under ``unacked_mutex``, records older than the visibility timeout
        go back to the front of their lists (plus the items of orphaned staging lists);
        returns how many moved."""
        token = uuid.uuid4().hex
        # kombu holds the mutex up to 300 s; ours expires after about one visibility timeout
        # so that a sweeper killed mid-sweep does not stall recovery (a second concurrent
        # sweep is harmless: every move re-checks its record atomically)
        expire_ms = int(min(max(visibility_timeout, 1.0), 30.0) * 1000)
        if not await self.client.set(self.keys.mutex, token, nx=True, px=expire_ms):
            return 0  # someone else (a Celery worker, another consumer) is sweeping
        try:
            ceil = time.time() - visibility_timeout
            moved = await self._restore_records(ceil, malformed=False)
            moved += await self._restore_records(ceil, malformed=True)
            return moved + await self.restore_orphan_stagings()
        finally:
            await self.unlock(keys=[self.keys.mutex], args=[token])

    async def _restore_records(self, ceil: float, *, malformed: bool) -> int:
        hash_key, index = self.record_keys(malformed)
        moved = 0
        while True:
            found = await self.client.zrangebyscore(index, "-inf", ceil, start=0, num=_SWEEP_BATCH)
            tags = cast(list[bytes], found)
            if not tags:
                return moved
            values = cast(list[bytes | None], await self.client.hmget(hash_key, tags))
            pipe = self.client.pipeline(transaction=False)
            for tag, value in zip(tags, values, strict=True):
                dest, payload = await self._restore_target(value, malformed)
                keys: list[str | bytes] = [hash_key, index, dest]
                await self.move(keys=keys, args=[tag, "R", payload, 0, ceil], client=pipe)
            moved += sum(int(n) for n in await pipe.execute())
            if len(tags) < _SWEEP_BATCH:
                return moved

    async def _restore_target(
        self, value: bytes | None, malformed: bool
    ) -> tuple[str | bytes, bytes]:
        """Where an expired record goes back to, and the item to push there. An orphan index
        entry (no record) is only dropped by the move script; an unreadable record is parked
        in ``serve_queue.unrestorable`` rather than retried forever."""
        unrestorable = self.keys.prefix + "serve_queue.unrestorable"
        if value is None:
            return unrestorable, b""
        if malformed:
            size, _, rest = value.partition(b":")
            if size.isdigit():
                return rest[: int(size)], rest[int(size) :]
            return unrestorable, value
        entry = unacked_entry(value)
        if entry is None:
            log.warning("an unacked record is not [envelope, exchange, routing_key]: parked")
            return unrestorable, value
        payload, exchange, routing_key, priority = entry
        queue = await self._bound_queue(exchange, routing_key)
        return self.keys.list_key(queue, step_for(priority)), payload

    async def _bound_queue(self, exchange: str, routing_key: str) -> str:
        """kombu's direct-exchange lookup: the queue bound to ``routing_key`` on ``exchange``
        (the anonymous exchange routes to the queue named by the routing key)."""
        if not exchange:
            return routing_key
        key = f"{self.keys.prefix}_kombu.binding.{exchange}"
        members = cast(set[bytes], await self.client.smembers(key))
        for member in sorted(members):
            parts = member.decode("utf-8", "replace").split(SEP)
            if len(parts) == 3 and parts[0] == routing_key and parts[2]:
                return parts[2]
        return routing_key
