"""Celery's Redis result backend, on ``redis.asyncio``: same keys, JSON, TTL and PUBLISH.

A meta for task ``id`` lives at ``[prefix]celery-task-meta-<id>`` (kombu JSON) and every write
is also published on the channel of the same name, so a Celery client blocked in
``AsyncResult.get()`` wakes at once. One Lua script does the whole write atomically (skip if a
SUCCESS is stored, SETEX or SET, PUBLISH); the stores of one loop tick go in one script call.
All ``wait()`` calls share one pub/sub connection (see ``serve_queue.results.listener``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from serve_queue.config import BrokerURL
from serve_queue.errors import MissingDependency, ResultBackendError, TaskTimeout
from serve_queue.results.batch import Batcher
from serve_queue.results.listener import Listener
from serve_queue.results.meta import decode_meta, encode_meta, is_ready

__all__ = ["RedisResultBackend"]

log = logging.getLogger("serve_queue.results")

TASK_KEYPREFIX = "celery-task-meta-"

# KEYS: the meta keys; ARGV[1]: TTL in ms (0: no expiry); ARGV[i + 1]: the meta for KEYS[i].
# Returns one character per key: "1" written and published, "0" left alone (holds SUCCESS).
_STORE_SCRIPT = """
local ttl = tonumber(ARGV[1])
local done = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local success = false
  if current then
    if string.sub(current, 1, 20) == '{"status": "SUCCESS"' then
      success = true
    elseif string.sub(current, 1, 1) == '{' then
      local ok, meta = pcall(cjson.decode, current)
      success = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
    end
  end
  if success then
    done[i] = '0'
  else
    if ttl > 0 then
      redis.call('PSETEX', key, ttl, ARGV[i + 1])
    else
      redis.call('SET', key, ARGV[i + 1])
    end
    redis.call('PUBLISH', key, ARGV[i + 1])
    done[i] = '1'
  end
end
return table.concat(done)
"""


def _import_redis() -> Any:
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as exc:
        raise MissingDependency("redis", "redis") from exc
    return redis_asyncio


def _client_errors() -> tuple[type[Exception], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)


def _keyprefix(global_keyprefix: str) -> str:
    """Celery's rule: a global prefix not ending in one of ``:_-.`` gets a ``_``."""
    if global_keyprefix and global_keyprefix[-1] not in ":_-.":
        global_keyprefix += "_"
    return global_keyprefix + TASK_KEYPREFIX


class RedisResultBackend:
    """Stores and reads task metas exactly like Celery's Redis result backend.

    ``result_ttl``: seconds a meta is kept (Celery's ``result_expires``, default one day);
    ``None`` or ``0`` keeps it forever. ``global_keyprefix``: Celery's
    ``result_backend_transport_options["global_keyprefix"]``.
    """

    def __init__(
        self,
        url: str | BrokerURL,
        *,
        result_ttl: float | None = 86400.0,
        global_keyprefix: str = "",
        max_batch: int = 500,
    ) -> None:
        _import_redis()
        self.url = url if isinstance(url, BrokerURL) else BrokerURL.parse(url)
        self.result_ttl = result_ttl
        self._ttl_ms = round(result_ttl * 1000) if result_ttl else 0
        self._prefix = _keyprefix(global_keyprefix)
        self._client: Any = None  # redis.asyncio.Redis once connected
        self._listener: Listener | None = None
        self._sha = ""
        self._stores: Batcher[tuple[str, str], bool]
        # Two store batches in flight at most: while one is on the wire the next one grows.
        # With more, a consumer fed one message at a time (AMQP push) sends a script call per
        # loop tick with a handful of metas each (4 in flight: ~10,400 results in 3.5 s on
        # RabbitMQ; 2: ~16,000).
        self._stores = Batcher(self._store_batch, max_batch=max_batch, max_inflight=2)
        self._gets: Batcher[str, bytes | None] = Batcher(self._get_batch, max_batch=max_batch)

    def __repr__(self) -> str:
        return f"RedisResultBackend({str(self.url)!r})"

    def key(self, task_id: str) -> str:
        """The Redis key (and pub/sub channel) of a task's meta."""
        return self._prefix + task_id

    async def connect(self) -> None:
        if self._client is not None:
            return
        redis_asyncio = _import_redis()
        from redis.backoff import ExponentialWithJitterBackoff

        # a dropped connection is retried (the pub/sub one resubscribes), then reported
        retry = redis_asyncio.retry.Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 5)
        client = redis_asyncio.Redis.from_url(self.url.render(reveal=True), retry=retry)
        try:
            await client.execute_command("PING")
            self._sha = await self._load_script(client)
        except _client_errors() as exc:
            await client.aclose()
            raise self._error("cannot connect to", exc) from exc
        self._client = client
        self._listener = Listener(client, self._fetch_payload, str(self.url))

    async def close(self) -> None:
        client, listener = self._client, self._listener
        if client is None:
            return
        await self._stores.drain()
        await self._gets.drain()
        self._client = self._listener = None
        if listener is not None:
            await listener.close()
        await client.aclose()

    async def store(
        self, task_id: str, meta: Mapping[str, Any], *, reply_to: str | None = None
    ) -> None:
        self._require()
        written = await self._stores.submit((self.key(task_id), encode_meta(task_id, meta)))
        if not written:
            log.debug("task %s: SUCCESS is stored, %s not written", task_id, meta.get("status"))

    async def get(self, task_id: str) -> dict[str, Any] | None:
        self._require()
        payload = await self._gets.submit(self.key(task_id))
        return None if payload is None else self._decode(task_id, payload)

    async def wait(self, task_id: str, timeout: float | None) -> dict[str, Any]:
        listener = self._require_listener()
        if timeout is not None and timeout <= 0:  # just look
            meta = await self.get(task_id)
            if meta is not None and is_ready(meta.get("status")):
                return meta
            raise TaskTimeout(f"task {task_id} is not ready")
        channel = self.key(task_id).encode()
        waiter, confirmed = listener.add(channel)
        try:
            return await asyncio.wait_for(self._until_ready(task_id, waiter, confirmed), timeout)
        except asyncio.TimeoutError:
            raise TaskTimeout(f"task {task_id} was not ready after {timeout}s") from None
        finally:
            listener.remove(channel, waiter)

    async def _until_ready(
        self,
        task_id: str,
        waiter: asyncio.Future[dict[str, Any]],
        confirmed: asyncio.Future[None],
    ) -> dict[str, Any]:
        # subscribed first, then read: a meta stored in between is seen by one or the other
        await asyncio.shield(confirmed)
        if not waiter.done():
            payload = await self._gets.submit(self.key(task_id))
            if payload is not None:
                meta = self._decode(task_id, payload)
                if is_ready(meta.get("status")):
                    return meta
        return await waiter

    # -- round trips -------------------------------------------------------------------

    async def _store_batch(self, items: list[tuple[str, str]]) -> list[bool]:
        client = self._require()
        keys = [key for key, _ in items]
        args = [*keys, str(self._ttl_ms), *(value for _, value in items)]
        from redis.exceptions import NoScriptError

        try:
            try:
                reply = await client.execute_command("EVALSHA", self._sha, len(keys), *args)
            except NoScriptError:  # the script cache was flushed
                self._sha = await self._load_script(client)
                reply = await client.execute_command("EVALSHA", self._sha, len(keys), *args)
        except _client_errors() as exc:
            raise self._error("cannot store results in", exc) from exc
        flags = reply.decode() if isinstance(reply, bytes) else str(reply)
        return [flag == "1" for flag in flags]

    async def _get_batch(self, keys: list[str]) -> list[bytes | None]:
        client = self._require()
        try:
            reply = await client.execute_command("MGET", *keys)
        except _client_errors() as exc:
            raise self._error("cannot read results from", exc) from exc
        return list(reply)

    async def _fetch_payload(self, channel: bytes) -> bytes | None:
        """For the listener: the stored meta of a channel (after a reconnect)."""
        return await self._gets.submit(channel.decode())

    @staticmethod
    async def _load_script(client: Any) -> str:
        sha = await client.execute_command("SCRIPT LOAD", _STORE_SCRIPT)
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    # -- helpers -----------------------------------------------------------------------

    def _decode(self, task_id: str, payload: bytes) -> dict[str, Any]:
        try:
            return decode_meta(payload)
        except ValueError as exc:
            raise ResultBackendError(f"task {task_id}: stored meta is not JSON: {exc}") from exc

    def _error(self, doing: str, exc: BaseException) -> ResultBackendError:
        return ResultBackendError(f"{doing} Redis result backend {self.url}: {exc}")

    def _require(self) -> Any:
        if self._client is None:
            raise ResultBackendError(f"{self!r} is not connected: call connect() first")
        return self._client

    def _require_listener(self) -> Listener:
        self._require()
        assert self._listener is not None
        return self._listener
