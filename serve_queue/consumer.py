"""The consumer loop: pull deliveries, run them concurrently within bounds, drain on stop.

``Consumer`` owns one adapter connection, one dispatcher and one executor. Its life is explicit::

    consumer = Consumer(adapter, registry, backend=backend, config=config)
    await consumer.start()             # connects, starts fetching on the running loop
    ...
    await consumer.stop(drain_timeout=30)

``stop`` stops fetching at once, lets running handlers finish within the drain budget, and then
closes the adapter, which hands every unsettled delivery (prefetched, or cut off at the deadline)
back to the broker immediately. A broker outage never ends the loop: the consumer backs off and
resumes; ``health()`` reports it unhealthy once the outage outlasts ``health_grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from types import TracebackType

from serve_queue.config import ConsumerConfig
from serve_queue.dispatcher import Dispatcher, Stats
from serve_queue.errors import BrokerError, ServeQueueError
from serve_queue.executor import Executor
from serve_queue.registry import Registry
from serve_queue.types import BrokerAdapter, DeadLetter, Delivery, QueueDepth, ResultBackend

__all__ = ["Consumer", "Health"]

log = logging.getLogger("serve_queue.consumer")

_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
#: how often a broker that looks down is probed
_PROBE_S = 0.5
#: crashes of the fetch loop in a row after which the consumer reports itself unhealthy
_FETCH_FAILURES_UNHEALTHY = 3


@dataclass(frozen=True, slots=True)
class Health:
    """Whether the consumer is fit to keep running, and if not, why."""

    ok: bool
    reason: str = ""


class Consumer:
    """Consumes ``config.queues`` from ``adapter`` and runs the handlers of ``registry``."""

    def __init__(
        self,
        adapter: BrokerAdapter,
        registry: Registry,
        *,
        backend: ResultBackend,
        config: ConsumerConfig,
    ) -> None:
        self.adapter = adapter
        self.registry = registry
        self.backend = backend
        self.config = config
        self.hostname = f"{config.hostname or f'serve-queue-{os.getpid()}'}@{socket.gethostname()}"
        self.executor = Executor(config.threads)
        self.dispatcher = Dispatcher(
            registry=registry,
            executor=self.executor,
            adapter=adapter,
            backend=backend,
            config=config,
            hostname=self.hostname,
        )
        self._slots = asyncio.Semaphore(config.concurrency)
        self._running: dict[asyncio.Task[None], tuple[Delivery, float]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._fetcher: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = asyncio.Event()
        self._broker_down_since: float | None = None
        self._last_error: str = ""
        self._loop_lag = 0.0
        self._fetch_failures = 0  # crashes of the fetch loop in a row (not broker outages)
        self._fetch_causes: set[str] = set()  # logged already
        self._fetch_error = ""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start consuming on the running event loop."""
        if self._started:
            return
        if not len(self.registry):
            log.warning("consumer %s starts with no task handlers registered", self.hostname)
        await self.backend.connect()
        await self._connect()
        self._started = True
        self._fetcher = asyncio.create_task(self._fetch_loop(), name="serve-queue-fetch")
        self._background = [
            asyncio.create_task(self._renew_leases(), name="serve-queue-leases"),
            asyncio.create_task(self._watch_loop(), name="serve-queue-loop-watch"),
            asyncio.create_task(self._watch_broker(), name="serve-queue-broker-watch"),
        ]
        log.info(
            "consumer %s started on %s (concurrency %d, threads %d, tasks: %s)",
            self.hostname,
            ", ".join(self.config.queues),
            self.config.concurrency,
            self.config.threads,
            ", ".join(self.registry.names()),
        )

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop fetching, let running handlers finish within ``drain_timeout`` seconds, then hand
        everything unfinished back to the broker and close connections."""
        if not self._started or self._stopped.is_set():
            return
        budget = self.config.drain_timeout if drain_timeout is None else drain_timeout
        if self._fetcher is not None:
            self._fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fetcher
        running = list(self._running)
        if running:
            log.info("draining %d running task(s), up to %.1fs", len(running), budget)
            _, late = (
                await asyncio.wait(running, timeout=budget) if budget > 0 else (set(), running)
            )
            for task in late:
                task.cancel()
            if late:
                log.warning("%d task(s) cut off by the drain deadline; handed back", len(late))
                await asyncio.wait(late, timeout=1.0)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._close_quietly()
        self.executor.shutdown(wait=False)
        self._stopped.set()
        log.info("consumer %s stopped", self.hostname)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- introspection -----------------------------------------------------------------

    @property
    def stats(self) -> Stats:
        return self.dispatcher.stats

    @property
    def lease_s(self) -> float:
        """How long a running task's lease lasts; renewed every third of it. The adapter's
        visibility timeout unless configured, so renewal always beats redelivery."""
        if self.config.lease_s is not None:
            return self.config.lease_s
        timeout = getattr(self.adapter, "visibility_timeout", None)
        return float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else 60.0

    @property
    def running(self) -> int:
        """How many deliveries are being processed right now."""
        return len(self._running)

    def health(self) -> Health:
        """Unhealthy when the broker has been unreachable past the grace or the loop stalls."""
        if self._stopped.is_set():
            return Health(False, "consumer stopped")
        if self._fetcher is not None and self._fetcher.done() and not self._fetcher.cancelled():
            return Health(False, f"fetch loop ended: {self._fetcher.exception()!r}")
        if self._fetch_failures >= _FETCH_FAILURES_UNHEALTHY:
            return Health(
                False, f"fetch loop failed {self._fetch_failures} times: {self._fetch_error}"
            )
        down = self._broker_down_since
        if down is not None and time.monotonic() - down > self.config.health_grace_s:
            return Health(
                False, f"broker unreachable for {time.monotonic() - down:.0f}s: {self._last_error}"
            )
        if self._loop_lag > self.config.max_loop_lag_s:
            return Health(False, f"event loop stalled for {self._loop_lag:.1f}s")
        return Health(True)

    async def depth(self) -> dict[str, QueueDepth]:
        """Depth of every consumed queue."""
        return {q: await self.adapter.depth(q) for q in self.config.queues}

    # -- the loop ----------------------------------------------------------------------

    async def _connect(self) -> None:
        attempt = 0
        while True:
            try:
                await self.adapter.connect()
                self._broker_up()
                return
            except BrokerError as exc:
                if not self._started and attempt == 0:
                    log.warning("cannot reach the broker yet, retrying: %s", exc)
                self._broker_down(exc)
                await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1

    async def _fetch_loop(self) -> None:
        prefetch = self.config.effective_prefetch
        attempt = 0
        while True:
            try:
                async for delivery in self.adapter.deliveries(self.config.queues, prefetch):
                    attempt = self._fetch_failures = 0
                    self._broker_up()
                    await self._slots.acquire()
                    self._spawn(delivery)
            except BrokerError as exc:
                self._broker_down(exc)
                log.warning("broker error while fetching, retrying: %s", exc)
                await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1
            except Exception as exc:  # a bug (ours or the client's): never end the loop
                self._fetch_failed(exc)
                await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1
            else:
                await asyncio.sleep(_BACKOFF_S[0])  # the adapter ended its stream: go again

    def _fetch_failed(self, exc: Exception) -> None:
        """Count a crash of the fetch loop; log each distinct cause once, with its traceback.
        ``health()`` is unhealthy from the ``_FETCH_FAILURES_UNHEALTHY``-th crash in a row
        until a delivery comes through again."""
        self._fetch_failures += 1
        cause = f"{type(exc).__name__}: {exc}"[:300]
        if cause not in self._fetch_causes:
            self._fetch_causes.add(cause)
            log.error("the fetch loop failed (restarting it with backoff): %s", cause, exc_info=exc)
        self._fetch_error = cause

    async def _watch_broker(self) -> None:
        """While the broker looks down, probe it: it is back as soon as it answers, even when
        no message comes to show it (on an idle queue it would otherwise look down for good)."""
        while True:
            await asyncio.sleep(_PROBE_S)
            if self._broker_down_since is None:
                continue
            try:
                await self.adapter.depth(self.config.queues[0])
            except BrokerError as exc:
                self._broker_down(exc)
            else:
                self._broker_up()

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._process(delivery))
        self._running[task] = (delivery, time.monotonic())
        task.add_done_callback(self._finished)

    async def _process(self, delivery: Delivery) -> None:
        try:
            await self.dispatcher.handle(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug of ours. Never let it end the loop and never ack blindly; left unsettled the
            # message would come back into the same bug forever, so keep it in the dead letters.
            log.exception("unexpected error while handling a delivery from %s", delivery.queue)
            self.stats.dead_lettered["internal-error"] += 1
            with contextlib.suppress(ServeQueueError):
                await self.adapter.settle(delivery, DeadLetter(f"internal-error: {exc!r}"))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slots.release()

    async def _renew_leases(self) -> None:
        lease = self.lease_s
        interval = lease / 3
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            due = [d for d, started in self._running.values() if now - started >= interval]
            outcomes = await asyncio.gather(
                *(self.adapter.extend(d, lease) for d in due),
                return_exceptions=True,
            )
            errors = [e for e in outcomes if isinstance(e, ServeQueueError)]
            if errors:
                log.warning("could not renew %d lease(s): %s", len(errors), errors[0])

    async def _watch_loop(self) -> None:
        tick = 0.5
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            self._loop_lag = max(0.0, time.monotonic() - before - tick)

    def _broker_up(self) -> None:
        self._broker_down_since = None

    def _broker_down(self, exc: BaseException) -> None:
        self._last_error = str(exc)
        if self._broker_down_since is None:
            self._broker_down_since = time.monotonic()

    async def _close_quietly(self) -> None:
        for closer in (self.adapter.close, self.backend.close):
            try:
                await closer()
            except ServeQueueError as exc:
                log.warning("error while closing: %s", exc)
