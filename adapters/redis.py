"""Redis broker adapter on ``redis.asyncio``, wire-compatible with Celery/kombu on the same DB.

Queues are kombu's lists (``q``, ``q\\x06\\x163``, ``q\\x06\\x166``, ``q\\x06\\x169``; producers
LPUSH, consumers take from the right, priority 0 first). In-flight messages are recorded like
kombu's ack emulation (``unacked`` hash ``tag -> '[<envelope>, "", "<queue>"]'`` + ``unacked_index``
zset, celery-wire-format.md §5.1.5), so Celery workers' restore sweeps and ours agree; the
routing key is the queue the item was taken from, so either sweep puts it back there. Keys and
Lua scripts: ``_redis_scripts``; needs Redis >= 6.2 (BLMOVE, LMOVE, RPOP count, ZRANGE BYSCORE).

- **Fetch**: one Lua call moves up to ``prefetch - unsettled`` items from the lists into
  ``unacked``/``unacked_index``: no item is ever off a list without being recorded in flight.
  A malformed item (not JSON, no ``properties.delivery_tag``) is recorded under a generated tag
  in ``serve_queue.unacked_raw`` (kombu could not restore it) and yielded with
  ``envelope_error`` and the raw item as ``body``.
- **Waiting**: when everything is empty, one connection per queue blocks on ``BLMOVE <queue>
  serve_queue.staging.<queue>.<adapter id> RIGHT LEFT <block_timeout>``, a staging list of this
  adapter's own (registered in the ``serve_queue.stagings`` zset until ``now +
  visibility_timeout``, renewed by every sweep cycle). The item it moves is yielded at once: its
  in-flight record is written by a claim script (staging -> ``unacked``) that goes out with the
  next pipeline, before any settle of it, so an idle consumer starts a task one round trip
  after the push, not two. No fetch ever reads a staging list, so no other consumer runs that
  item; if its owner dies before the claim, the item waits in staging until a sweep sees the
  registration expired and puts it back at the front of its list (``close()`` puts its own
  back at once). Staging counts as ready in ``depth``. Only the base list wakes a waiter:
  priority sub-lists and delayed items coming due are seen by the fetch that follows every
  wake-up, so while idle they wait at most ``block_timeout`` (0.5 s).
- **Settle** calls, publishes and lease renewals made during one loop tick go out together in
  one pipeline. Ack = HDEL + ZREM. Requeue(0) = LPUSH (back of the line), marked redelivered.
  Requeue(delay) parks the item in the zset ``serve_queue.delayed.<queue>`` (score = due time);
  the fetch script moves due items to the *front* of their list. Celery workers do not know this
  zset: only serve_queue consumers release delayed items. DeadLetter pushes the JSON record
  ``{"reason", "queue", "dead_lettered_at" (unix time), "item"[, "item_encoding": "base64"]}``
  onto ``dead_letter_queue.format(queue=...)``. Each is one atomic script that acts only if the
  record is still in flight, so a settle racing a restore happens once.
- **Lease**: ``extend(d, s)`` sets the ``unacked_index`` score to ``now + s - visibility_timeout``:
  sweeps restore scores older than ``now - visibility_timeout``, so the entry expires ``s``
  seconds from now (later still for a Celery sweeper with a longer timeout).
- **Restore sweep**, while consuming (when ``deliveries()`` starts, then every
  ``visibility_timeout / 4``; ``restore_expired()`` runs one now): under kombu's
  ``unacked_mutex`` (SET NX PX, expiring after about one visibility timeout, not kombu's 300 s,
  so a sweeper killed mid-sweep does not stall recovery), entries older than
  ``now - visibility_timeout`` go back to the *front* of their list with ``headers.redelivered``
  and ``delivery_info.redelivered`` set (JSON edited in Python; the move re-checks the score);
  malformed records go back raw; so do the items of staging lists whose registration expired.
  A producer-only adapter never sweeps, so it cannot restore the running tasks of Celery
  workers.
- **close()** stops fetching and puts every unsettled delivery of this adapter back at the front
  of its list at once, marked redelivered; a later settle of those deliveries is a no-op.
- **Errors**: client errors become ``BrokerUnavailable`` (connection, timeout) or ``BrokerError``.
  ``deliveries()`` raises on connection loss and the consumer re-enters it with its own backoff;
  nothing is lost: fetched messages sit in ``unacked`` until settled, handed back or swept. A
  command is retried on a broken connection, never after a timeout (it may have run).

``visibility_timeout`` defaults to 60 s, not kombu's 3600 s: our consumers renew leases, so a
crashed consumer's work comes back in about a minute. A Redis shared with Celery workers that do
not renew leases must use a ``visibility_timeout`` at least as long as their longest task (and
ETA wait), or our sweep will restore their running tasks and they run twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from serve_queue.adapters._redis_age import HeadClock
from serve_queue.adapters._redis_envelope import (
    dead_letter_record,
    decode_delivery,
    encode_envelope,
    mark_redelivered,
)
from serve_queue.adapters._redis_scripts import RedisKeys, quoted, step_for
from serve_queue.config import BrokerURL
from serve_queue.errors import BrokerError, BrokerUnavailable, ConfigurationError, MissingDependency
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

try:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from serve_queue.adapters._redis_inflight import Batcher, InflightStore, Op, Token
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependency("redis", "redis") from exc

__all__ = ["RedisAdapter"]

log = logging.getLogger(__name__)

_FETCH_MAX = 1000  # items per fetch script call
_CLIENT_ERRORS = (RedisError, OSError)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that redis-py lost: on Python 3.11 its ``asyncio.wait_for``
    around socket writes can return normally when the task is cancelled as the write ends."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _retry() -> Retry:
    """Retry a command twice on a broken connection (a stale pooled socket), never on a
    timeout: the server may have run it, and fetches and publishes must not run twice."""
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, (RedisConnectionError,))


class RedisAdapter:
    """``BrokerAdapter`` for ``redis://`` / ``rediss://`` URLs (see the module docstring)."""

    def __init__(
        self,
        url: str | BrokerURL,
        *,
        visibility_timeout: float = 60.0,
        dead_letter_queue: str = "{queue}.dlq",
        global_keyprefix: str = "",
        socket_timeout: float | None = 10.0,
        max_connections: int | None = None,
        block_timeout: float = 0.5,
    ) -> None:
        self._url = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
        if self._url.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"RedisAdapter needs a redis:// URL, not {self._url}")
        if visibility_timeout <= 0 or block_timeout <= 0:
            raise ConfigurationError("visibility_timeout and block_timeout must be > 0")
        try:
            dead_letter_queue.format(queue="q")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigurationError(f"bad dead_letter_queue {dead_letter_queue!r}") from exc
        self.visibility_timeout = float(visibility_timeout)
        self._keys = RedisKeys(global_keyprefix, dead_letter_queue)
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        self._block_timeout = block_timeout
        self._store: InflightStore | None = None
        self._blocking: Redis | None = None
        self._inflight: dict[bytes, Token] = {}
        self._heads = HeadClock()
        self._settling = 0  # settled by the caller, not yet flushed to Redis
        self._room = asyncio.Event()
        self._fetch_lock = asyncio.Lock()
        self._closing = False
        self._queues: set[str] = set()
        self._blockers: dict[str, asyncio.Task[bytes | None]] = {}
        self._owner = ""  # names this adapter's staging lists; new on every connect()
        self._staged = 0  # items taken from staging so far (their tags' sequence)
        self._staging_dirty = False  # staging may hold items no claim will record
        self._sweeper: asyncio.Task[None] | None = None
        self._batcher = Batcher(self._flush)

    def __repr__(self) -> str:
        return f"RedisAdapter({self._url.render()!r})"

    # -- lifecycle --------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._store is not None:
            return
        url = self._url.render(reveal=True)
        timeout = self._socket_timeout
        try:
            client = Redis.from_url(
                url, socket_timeout=timeout, max_connections=self._max_connections, retry=_retry()
            )
            blocking = Redis.from_url(
                url, socket_timeout=self._block_timeout + (timeout or 10), retry=_retry()
            )
        except ValueError:  # the message may echo the URL: do not chain it
            raise ConfigurationError(f"bad Redis URL {self._url}") from None
        try:
            await client.ping()
        except _CLIENT_ERRORS as exc:
            await client.aclose()
            await blocking.aclose()
            raise self._error(exc, "connect") from exc
        self._store, self._blocking = InflightStore(client, self._keys), blocking
        self._owner, self._staged = uuid.uuid4().hex[:12], 0
        self._closing = False

    async def close(self) -> None:
        """Stop fetching; hand every unsettled delivery back to the front of its list now."""
        store, blocking = self._store, self._blocking
        if store is None or blocking is None:
            return
        self._closing = True
        self._room.set()
        tasks = [*self._blockers.values(), *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._blockers.clear()
        self._sweeper = None
        async with self._fetch_lock:  # a fetch under way records its items first
            tokens = list(self._inflight.values())
            self._inflight.clear()
        try:
            await self._batcher.drain()
            await store.hand_back(tokens)
            await store.restore_staging(*self._staging_lists(sorted(self._queues)))
        except _CLIENT_ERRORS as exc:
            raise self._error(exc, "close (handing deliveries back)") from exc
        finally:
            self._store = self._blocking = None
            await store.client.aclose()
            await blocking.aclose()

    # -- producing --------------------------------------------------------------------------

    async def publish(self, queue: str, message: OutgoingMessage) -> None:
        self._require()
        key = self._keys.list_key(queue, step_for(message.priority))
        await self._batcher.submit(Op("push", key=key, payload=encode_envelope(queue, message)))

    # -- consuming --------------------------------------------------------------------------

    async def deliveries(self, queues: Sequence[str], prefetch: int) -> AsyncIterator[Delivery]:
        """Yield deliveries, at most ``prefetch`` unsettled ones from this adapter at a time.

        On connection loss this raises ``BrokerUnavailable`` (nothing is lost: fetched messages
        stay in ``unacked`` until settled or restored); call it again to resume.
        """
        names = queue_list(queues)
        if not names or prefetch < 1:
            raise ConfigurationError("deliveries() needs at least one queue and prefetch >= 1")
        self._require()
        self._queues.update(names)
        await self._register_staging(names)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever())
        pending: deque[Delivery] = deque()
        turn = 0
        woke = False
        try:
            while not self._closing:
                if pending:
                    yield pending.popleft()
                    continue
                if woke:  # let the task we woke for start before our next round trip
                    woke = False
                    await asyncio.sleep(0)
                room = prefetch - len(self._inflight) - self._settling
                if room <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                if self._staging_dirty:
                    await self._reset_staging()
                turn = (turn + 1) % len(names)
                order = names[turn:] + names[:turn]  # round-robin between queues
                batch = await self._fetch(order, min(room, _FETCH_MAX))
                _raise_if_cancelled()
                if not batch:
                    batch = await self._wait_for_work(order, room)
                    woke = bool(batch)
                pending.extend(batch)
        finally:
            self._staging_dirty = True  # a blocker may have parked an item nobody will claim
            await self._give_back_unyielded(pending)

    async def _fetch(self, queues: list[str], limit: int) -> list[Delivery]:
        store = self._require()
        args = [limit, repr(time.time()), f"sq-{uuid.uuid4().hex}-", *map(quoted, queues)]
        async with self._fetch_lock:
            if self._closing:
                return []
            try:
                reply = await store.fetch(keys=self._keys.fetch_keys(queues), args=args)
            except _CLIENT_ERRORS as exc:
                raise self._error(exc, "fetch") from exc
            return self._record(queues, reply)

    def _record(self, queues: list[str], reply: list[bytes]) -> list[Delivery]:
        """Deliveries from the fetch script's reply (see ``_redis_scripts.FETCH``)."""
        codes = [int(c) for c in reply[0].split(b",")] if reply[0] else []
        tags = reply[1]
        out: list[Delivery] = []
        inflight = self._inflight
        start = 0
        for i, item in enumerate(reply[2:]):
            where, kind = divmod(codes[2 * i], 10)
            index, step = divmod(where, 10)
            end = start + codes[2 * i + 1]
            token = Token(tags[start:end], item, queues[index], step, kind == 1)
            start = end
            inflight[token.tag] = token
            out.append(decode_delivery(item, token.queue, token, token.malformed))
        return out

    async def _wait_for_work(self, queues: list[str], room: int) -> list[Delivery]:
        """Block (one BLMOVE per queue, each on its own connection) until a base list has work
        or ``block_timeout`` passes; the items moved to staging (at most ``room``; a later
        call takes the rest) are in flight from here on, their claims posted."""
        if len(queues) == 1 and queues[0] not in self._blockers:
            # one queue: wait inline (a cancelled wait may leave its item in staging: the
            # generator's exit marks staging dirty, so it is put back)
            item = await self._block(queues[0])
            return [] if item is None else [self._claim(queues[0], item)]
        for queue in queues:
            task = self._blockers.get(queue)
            if task is None:
                self._blockers[queue] = asyncio.create_task(self._block(queue))
        tasks = [self._blockers[q] for q in queues]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        staged: list[Delivery] = []
        for queue in queues:
            task = self._blockers[queue]
            if not task.done() or len(staged) >= room:
                continue
            del self._blockers[queue]
            if task.cancelled():
                continue
            if (exc := task.exception()) is not None:
                raise exc
            item = task.result()
            if item is not None:
                staged.append(self._claim(queue, item))
        return staged

    async def _block(self, queue: str) -> bytes | None:
        blocking = self._blocking
        if blocking is None:
            return None
        k = self._keys
        try:
            return cast(
                "bytes | None",
                await cast(Any, blocking).execute_command(
                    "BLMOVE",
                    k.list_key(queue),
                    k.staging(queue, self._owner),
                    "RIGHT",
                    "LEFT",
                    self._block_timeout,
                ),
            )
        except _CLIENT_ERRORS as exc:
            raise self._error(exc, f"waiting on queue {queue!r}") from exc

    def _claim(self, queue: str, item: bytes) -> Delivery:
        """Take an item our BLMOVE parked in staging into flight: the claim script that
        records it goes out with the next pipeline, ahead of any settle of it."""
        self._staged += 1
        tag = f"sq-{self._owner}-s{self._staged}".encode()
        token = Token(tag, item, queue, 0, False)
        delivery = decode_delivery(item, queue, token, None)  # sets token.malformed
        self._inflight[tag] = token
        k = self._keys
        op = Op(
            "claim",
            tag,
            token.malformed,
            key=k.staging(queue, self._owner),
            payload=item,
            score=time.time(),
            mode=quoted(queue),
            base=k.list_key(queue),
        )
        # posted on the next loop turn, after the consumer spawned the task for this delivery
        # (still before any settle of it), so that the task starts ahead of the claim's flush
        asyncio.get_running_loop().call_soon(self._batcher.post, op)
        return delivery

    def _staging_lists(self, queues: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
        """This adapter's (staging, base list) pairs for ``queues``, and their registrations."""
        k, owner = self._keys, self._owner
        lists = [(k.staging(q, owner), k.list_key(q)) for q in queues]
        return lists, [k.staging_member(q, owner) for q in queues]

    async def _register_staging(self, queues: list[str]) -> None:
        """Register (renew) our staging lists for another visibility timeout."""
        _, members = self._staging_lists(queues)
        try:
            await self._require().register_staging(members, time.time() + self.visibility_timeout)
        except _CLIENT_ERRORS as exc:
            raise self._error(exc, "registering staging lists") from exc

    async def _reset_staging(self) -> None:
        """After an interrupted wait or a failed claim: stop the blockers, let pending claims
        go out, and put back what is still parked in our staging lists (an item a failed claim
        left there runs again: at least once)."""
        blockers = list(self._blockers.values())
        self._blockers.clear()
        for task in blockers:
            task.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)
        await self._batcher.drain()
        lists, _ = self._staging_lists(sorted(self._queues))
        try:
            await self._require().restore_staging(lists, [])
        except _CLIENT_ERRORS as exc:
            raise self._error(exc, "putting back staged items") from exc
        self._staging_dirty = False

    async def _give_back_unyielded(self, pending: deque[Delivery]) -> None:
        tokens: list[Token] = [d.token for d in pending if self._own(d) is not None]
        for token in tokens:
            del self._inflight[token.tag]
        if tokens and self._store is not None:
            self._room.set()
            try:
                await self._batcher.drain()  # claims first: a hand-back moves recorded items
                await self._store.hand_back(tokens)
            except _CLIENT_ERRORS:  # still in unacked: the restore sweep brings them back
                log.warning("could not hand back %d prefetched deliveries", len(tokens))

    # -- settling ---------------------------------------------------------------------------

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        token = self._own(delivery)
        if token is None:
            return  # already settled, or handed back by close()
        op = self._settle_op(token, outcome)
        del self._inflight[token.tag]
        # Still in unacked until the batch is flushed: it counts against the prefetch until
        # then, or a fetch would move a whole new batch in while the acks are on their way.
        self._settling += 1
        try:
            await self._batcher.submit(op)
        finally:
            self._settling -= 1
            self._room.set()

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """Renew the lease: the record expires ``seconds`` from now (score = now + seconds -
        visibility_timeout, since sweeps restore scores older than now - visibility_timeout)."""
        token = self._own(delivery)
        if token is not None:
            score = time.time() + seconds - self.visibility_timeout
            await self._batcher.submit(Op("extend", token.tag, token.malformed, score=score))

    def _own(self, delivery: Delivery) -> Token | None:
        token = delivery.token
        if isinstance(token, Token) and self._inflight.get(token.tag) is token:
            return token
        return None

    def _settle_op(self, token: Token, outcome: Outcome) -> Op:
        if isinstance(outcome, Ack):
            return Op("ack", token.tag, token.malformed)
        if isinstance(outcome, Requeue):
            payload = token.raw if token.malformed else mark_redelivered(token.raw)
            if outcome.delay_s > 0:
                member = uuid.uuid4().hex.encode() + str(token.step).encode() + payload
                due = time.time() + outcome.delay_s
                key = self._keys.delayed(token.queue)
                return Op("move", token.tag, token.malformed, key, member, due, "Z")
            key = self._keys.list_key(token.queue, token.step)
            return Op("move", token.tag, token.malformed, key, payload, mode="L")
        if isinstance(outcome, DeadLetter):
            record = dead_letter_record(token.raw, outcome.reason, token.queue)
            key = self._keys.dlq(token.queue)
            return Op("move", token.tag, token.malformed, key, record, mode="L")
        raise TypeError(f"not an outcome: {outcome!r}")

    async def _flush(self, ops: list[Op]) -> None:
        try:
            await self._require().flush(ops)
        except _CLIENT_ERRORS as exc:
            self._staging_dirty = True  # a claim in this batch may not have run
            raise self._error(exc, "settle/publish") from exc

    # -- restoring --------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(self.visibility_timeout / 4, 60.0))
        while not self._closing:  # checked too: a cancel may be lost (see _raise_if_cancelled)
            try:
                await self._register_staging(sorted(self._queues))
                await self.restore_expired()
            except BrokerError as exc:
                log.warning("restore sweep failed: %s", exc)
            _raise_if_cancelled()
            await asyncio.sleep(interval)

    async def restore_expired(self) -> int:
        """Run one kombu-compatible restore sweep now; returns how many items went back."""
        store = self._require()
        try:
            return await store.sweep(self.visibility_timeout)
        except _CLIENT_ERRORS as exc:
            raise self._error(exc, "restore sweep") from exc

    # -- depth ------------------------------------------------------------------------------

    async def depth(self, queue: str) -> QueueDepth:
        """Ready (4 priority lists + staging), reserved (in flight anywhere: ``unacked``
        records routed to this queue, malformed ones too), delayed (our delayed zset); while
        something is ready, the oldest age of the lists' heads (``_redis_age``)."""
        store = self._require()
        q = quoted(queue)
        try:
            ready, reserved, delayed = await store.depth(
                keys=self._keys.depth_keys(queue), args=[f", {q}]", f",{q}]"]
            )
            oldest = await self._oldest_age(store, queue) if ready else None
        except _CLIENT_ERRORS as exc:
            raise self._error(exc, "depth") from exc
        return QueueDepth(ready=ready, reserved=reserved, delayed=delayed, oldest_age_s=oldest)

    async def _oldest_age(self, store: InflightStore, queue: str) -> float | None:
        """Peek (``LINDEX -1``, one pipeline) the next item of each priority list."""
        keys = self._keys.list_keys(queue)
        pipe = store.client.pipeline(transaction=False)
        for key in keys:
            pipe.lindex(key, -1)
        heads = await pipe.execute()
        return self._heads.oldest(
            dict(zip(keys, heads, strict=True)), now=time.time(), mono=time.monotonic()
        )

    # -- helpers ----------------------------------------------------------------------------

    def _require(self) -> InflightStore:
        if self._store is None:
            raise BrokerError(f"{self!r} is not connected: call connect() first")
        return self._store

    def _error(self, exc: BaseException, doing: str) -> BrokerError:
        unavailable = isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))
        text = f"redis {doing} failed ({self._url}): {type(exc).__name__}: {exc}"
        secret = self._url.password.get_secret_value() if self._url.password else ""
        if secret:
            text = text.replace(secret, "***")
        return (BrokerUnavailable if unavailable else BrokerError)(text)
