"""One Redis pub/sub connection shared by every ``wait()``: subscribes per task channel and
routes each published ready meta to the futures waiting on that channel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serve_queue.errors import ResultBackendError
from serve_queue.results.meta import decode_meta, is_ready

__all__ = ["Listener"]

log = logging.getLogger("serve_queue.results")

Fetch = Callable[[bytes], Awaitable[bytes | None]]


def _settled_failure(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved here: nobody may be left to await it


@dataclass(eq=False)
class _Channel:
    """The waiters on one channel and whether the server confirmed our SUBSCRIBE."""

    confirmed: asyncio.Future[None]
    waiters: set[asyncio.Future[dict[str, Any]]] = field(default_factory=set)

    def deliver(self, meta: dict[str, Any], payload: bytes) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(meta)
                meta = decode_meta(payload)  # a copy for the next one: callers may mutate


class Listener:
    """Routes pub/sub messages to waiting futures over a single connection.

    ``add(channel)`` registers a waiter and returns it with a future that resolves once the
    server confirmed the subscription (only then may the caller read the key: a meta stored
    afterwards is published to us). SUBSCRIBE/UNSUBSCRIBE calls of one tick go out as one
    command each. After a reconnect redis-py resubscribes; each unexpected subscribe
    confirmation makes us re-read that key (``fetch``), as a publish may have been missed.
    """

    def __init__(self, client: Any, fetch: Fetch, name: str) -> None:
        self._client = client
        self._fetch = fetch
        self._name = name
        self._pubsub: Any = None  # redis.asyncio.client.PubSub
        self._channels: dict[bytes, _Channel] = {}
        self._unconfirmed: dict[bytes, int] = {}
        self._ops: list[tuple[bool, bytes]] = []
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def channels(self) -> int:
        """How many channels have waiters."""
        return len(self._channels)

    def add(self, channel: bytes) -> tuple[asyncio.Future[dict[str, Any]], asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(loop.create_future())
            self._queue(True, channel)
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        state.waiters.add(waiter)
        return waiter, state.confirmed

    def remove(self, channel: bytes, waiter: asyncio.Future[dict[str, Any]]) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        state.waiters.discard(waiter)
        if not state.waiters:
            del self._channels[channel]
            self._queue(False, channel)

    async def close(self) -> None:
        tasks = [t for t in (self._sender, self._reader, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_all(ResultBackendError(f"result backend {self._name} was closed"))
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None

    # -- subscribing ---------------------------------------------------------------------

    def _queue(self, subscribe: bool, channel: bytes) -> None:
        self._ops.append((subscribe, channel))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_ops())

    async def _send_ops(self) -> None:
        try:
            while self._ops:
                subscribe = self._ops[0][0]
                run = 0
                while run < len(self._ops) and self._ops[run][0] == subscribe:
                    run += 1
                channels = [channel for _, channel in self._ops[:run]]
                del self._ops[:run]
                await self._send(subscribe, channels)
        finally:
            self._sender = None

    async def _send(self, subscribe: bool, channels: list[bytes]) -> None:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        pubsub = self._pubsub
        try:
            if subscribe:
                for channel in channels:
                    self._unconfirmed[channel] = self._unconfirmed.get(channel, 0) + 1
                await pubsub.subscribe(*channels)
                if self._pubsub is pubsub and self._reader is None:
                    self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))
            else:
                await pubsub.unsubscribe(*channels)
        except Exception as exc:
            error = ResultBackendError(f"cannot subscribe on result backend {self._name}: {exc}")
            error.__cause__ = exc
            if self._pubsub is pubsub:
                self._reset(error)

    # -- reading -------------------------------------------------------------------------

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._route(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._pubsub is not pubsub:  # an older connection, already replaced
                return
            log.warning("result backend %s: pub/sub connection lost: %s", self._name, exc)
            error = ResultBackendError(f"pub/sub connection to {self._name} lost: {exc}")
            error.__cause__ = exc
            self._reset(error)

    def _route(self, message: dict[str, Any]) -> None:
        kind, channel = message.get("type"), message.get("channel")
        if not isinstance(channel, bytes):
            return
        state = self._channels.get(channel)
        if kind == "subscribe":
            pending = self._unconfirmed.pop(channel, 0)
            if pending > 1:
                self._unconfirmed[channel] = pending - 1
            elif state is not None and pending == 1 and not state.confirmed.done():
                state.confirmed.set_result(None)
            elif pending == 0:  # resubscribed by redis-py after a reconnect
                if state is None:
                    self._queue(False, channel)  # its unsubscribe was lost with the connection
                else:
                    self._spawn(self._recheck(channel))
        elif kind == "message" and state is not None:
            self._offer(channel, state, message.get("data"))

    def _offer(self, channel: bytes, state: _Channel, payload: Any) -> None:
        if not isinstance(payload, bytes):
            return
        try:
            meta = decode_meta(payload)
        except ValueError as exc:
            log.warning("ignoring an undecodable meta published on %r: %s", channel, exc)
            return
        if is_ready(meta.get("status")):
            state.deliver(meta, payload)

    async def _recheck(self, channel: bytes) -> None:
        try:
            payload = await self._fetch(channel)
        except ResultBackendError as exc:
            log.warning("result backend %s: cannot re-read %r: %s", self._name, channel, exc)
            return
        state = self._channels.get(channel)
        if payload is not None and state is not None:
            self._offer(channel, state, payload)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- failure -------------------------------------------------------------------------

    def _reset(self, error: ResultBackendError) -> None:
        """Fail every current waiter and start over with a fresh pub/sub connection."""
        self._fail_all(error)
        pubsub, self._pubsub = self._pubsub, None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._unconfirmed.clear()
        self._ops.clear()
        if pubsub is not None:
            self._spawn(pubsub.aclose())

    def _fail_all(self, error: ResultBackendError) -> None:
        channels, self._channels = self._channels, {}
        for state in channels.values():
            _settled_failure(state.confirmed, error)
            for waiter in state.waiters:
                _settled_failure(waiter, error)
