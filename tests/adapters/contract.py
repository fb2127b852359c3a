"""The contract every broker adapter passes (design.md section 4): one suite, one subclass each.

``AdapterContract`` is not collected by itself (no ``Test`` prefix). A broker's test module
subclasses it and tells it how to reach the broker::

    class TestRedisContract(AdapterContract):
        @pytest.fixture(autouse=True)
        def _broker(self, redis_url: str) -> None:
            self.url = redis_url                       # runs before every contract test

        def make_adapter(self, **overrides: Any) -> BrokerAdapter:
            return RedisAdapter(self.url, **overrides)

        def adapter_spec(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
            return "serve_queue.adapters.redis:RedisAdapter", {"url": self.url, **overrides}

        async def dead_letters(self, adapter, queue) -> list[tuple[bytes, str]]:
            ...                                        # read f"{queue}.dlq" with your client

        async def push_raw(self, queue: str, raw: bytes) -> None:   # optional
            ...                                        # LPUSH raw onto the queue's list

Required:

- ``make_adapter(**overrides)``: a fresh, not yet connected adapter on the test broker.
  ``overrides`` are constructor keywords: ``visibility_timeout``, ``dead_letter_queue``.
- ``dead_letters(adapter, queue)``: the ``(original body bytes, reason)`` pairs currently in
  the dead-letter destination of ``queue`` (``adapter`` is connected, use it or your client).
- ``adapter_spec(**overrides)`` when ``crash_mode == "process"``: ``("module:Class", kwargs)``
  with JSON-able kwargs (the URL under ``"url"``) so that ``_crash_consumer.py`` builds the same
  adapter, ``Class(**kwargs)``, in a subprocess that the test then kills with SIGKILL.

Optional:

- ``push_raw(queue, raw)``: put a transport item on ``queue`` that the adapter cannot unwrap
  (``raw`` is not a valid envelope). Without it the malformed-input test is skipped, a
  documented capability difference (AMQP has no envelope to break), never a hidden skip.
- ``crash_in_process(adapter)`` when ``crash_mode == "abandon"`` (adapters whose broker lives
  in the test process): make ``adapter`` die without closing; its unsettled deliveries must
  come back after the lease. The default does nothing (the adapter is simply dropped).
- class attributes: ``crash_mode`` (``"process"`` or ``"abandon"``), ``lease_s`` (the short
  visibility timeout of the lease tests, 2.0), ``redelivery_timeout`` (how long a redelivery
  or hand-back may take to show up beyond the lease, 15.0), ``quiet_s`` (how long "nothing
  more arrives" is watched, 0.5), ``depth_timeout`` (how long depth may take to settle, for
  approximate counters, 5.0), ``supports_priority`` (the ``priority`` property round-trips).

Every test uses queues of its own (uuid names) and closes what it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from serve_queue.types import (
    Ack,
    BrokerAdapter,
    DeadLetter,
    Delivery,
    OutgoingMessage,
    QueueDepth,
    Requeue,
)
from tests.adapters.fuzz import hostile_items

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class Pump:
    """Drains ``adapter.deliveries()`` in a background task into a local queue.

    Waiting with a timeout on the local queue never cancels the adapter's iterator, so one
    iterator (and its prefetch count) lives for the whole test.
    """

    def __init__(self, adapter: BrokerAdapter, queues: Sequence[str], prefetch: int) -> None:
        self.seen: list[Delivery] = []
        self.error: BaseException | None = None
        self._inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(adapter.deliveries(list(queues), prefetch)))

    async def _run(self, iterator: AsyncIterator[Delivery]) -> None:
        try:
            async for delivery in iterator:
                self.seen.append(delivery)
                self._inbox.put_nowait(delivery)
        except Exception as exc:  # reported by take() / finished()
            self.error = exc
        finally:
            self._inbox.put_nowait(None)

    async def take(self, count: int, timeout: float, why: str = "") -> list[Delivery]:
        """The next ``count`` deliveries, or fail after ``timeout`` seconds in all."""
        got: list[Delivery] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                item = await asyncio.wait_for(self._inbox.get(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                pytest.fail(f"{why}: got {len(got)} of {count} deliveries within {timeout}s")
            if item is None:
                self._inbox.put_nowait(None)
                pytest.fail(
                    f"{why}: the delivery stream ended after {len(got)} of {count}"
                    f" (error: {self.error!r})"
                )
            got.append(item)
        return got

    async def expect_quiet(self, seconds: float, why: str) -> None:
        """Fail if a delivery arrives within ``seconds``."""
        try:
            item = await asyncio.wait_for(self._inbox.get(), seconds)
        except asyncio.TimeoutError:
            return
        if item is None:
            self._inbox.put_nowait(None)
            assert self.error is None, f"the delivery stream failed: {self.error!r}"
            return
        pytest.fail(
            f"{why}: unexpected delivery {item.body[:60]!r} (redelivered={item.redelivered})"
        )

    async def ended(self, timeout: float, why: str) -> BaseException | None:
        """Wait for the iterator to end (fail if it does not); the exception it raised, if any."""
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        assert done, f"{why}: the deliveries() iterator did not end within {timeout}s"
        return self.error

    async def finished(self, timeout: float, why: str) -> None:
        """Wait for the iterator to end; fail if it does not, or if it ended with an error."""
        error = await self.ended(timeout, why)
        assert error is None, f"{why}: the iterator ended with {error!r}"

    async def stop(self, timeout: float = 10.0) -> None:
        """Cancel the iterator's task; fail if the iterator does not end within ``timeout``."""
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        assert done, f"a deliveries() iterator ignored cancellation for {timeout}s"
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class AdapterContract:
    """Semantics every ``BrokerAdapter`` must have. See the module docstring for the API."""

    crash_mode: ClassVar[str] = "process"
    lease_s: ClassVar[float] = 2.0
    redelivery_timeout: ClassVar[float] = 15.0
    quiet_s: ClassVar[float] = 0.5
    depth_timeout: ClassVar[float] = 5.0
    supports_priority: ClassVar[bool] = True
    fuzz_cases: ClassVar[int] = 120

    # -- hooks --------------------------------------------------------------------------

    def make_adapter(self, **overrides: Any) -> BrokerAdapter:
        raise NotImplementedError("a contract subclass must define make_adapter()")

    def adapter_spec(self, **overrides: Any) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError("crash_mode 'process' needs adapter_spec()")

    async def dead_letters(self, adapter: BrokerAdapter, queue: str) -> list[tuple[bytes, str]]:
        raise NotImplementedError("a contract subclass must define dead_letters()")

    async def push_raw(self, queue: str, raw: bytes) -> None:
        raise NotImplementedError  # optional: see the module docstring

    async def crash_in_process(self, adapter: BrokerAdapter) -> None:
        """Make ``adapter`` die without closing (crash_mode 'abandon'); default: drop it."""

    # -- helpers ------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    async def _contract_resources(self) -> AsyncIterator[None]:
        self._adapters: list[BrokerAdapter] = []
        self._pumps: list[Pump] = []
        yield
        for pump in self._pumps:
            await pump.stop()
        for adapter in self._adapters:
            closing = asyncio.ensure_future(adapter.close())
            done, _ = await asyncio.wait({closing}, timeout=self.redelivery_timeout)
            assert done, f"{adapter!r}.close() did not return within {self.redelivery_timeout}s"
            closing.result()

    @staticmethod
    def queue_name(tag: str) -> str:
        return f"sq-{tag}-{uuid.uuid4().hex[:10]}"

    async def open(self, **overrides: Any) -> BrokerAdapter:
        """A connected adapter, closed after the test."""
        adapter = self.make_adapter(**overrides)
        await adapter.connect()
        self._adapters.append(adapter)
        return adapter

    def consume(self, adapter: BrokerAdapter, queues: Sequence[str], prefetch: int) -> Pump:
        pump = Pump(adapter, queues, prefetch)
        self._pumps.append(pump)
        return pump

    @staticmethod
    async def publish_all(adapter: BrokerAdapter, queue: str, bodies: Sequence[bytes]) -> None:
        for start in range(0, len(bodies), 25):
            chunk = bodies[start : start + 25]
            await asyncio.gather(*(adapter.publish(queue, OutgoingMessage(body=b)) for b in chunk))

    async def eventually(
        self, probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], why: str
    ) -> T:
        """Probe until ``ok`` (every 50 ms, up to ``depth_timeout``); fail with the last value."""
        deadline = time.monotonic() + self.depth_timeout
        while True:
            value = await probe()
            if ok(value):
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"{why}: still {value!r} after {self.depth_timeout}s")
            await asyncio.sleep(0.05)

    async def wait_depth(
        self, adapter: BrokerAdapter, queue: str, ready: int, reserved: int, delayed: int
    ) -> QueueDepth:
        want = (ready, reserved, delayed)
        return await self.eventually(
            lambda: adapter.depth(queue),
            lambda d: (d.ready, d.reserved, d.delayed) == want,
            f"depth of {queue} should be (ready, reserved, delayed) = {want}",
        )

    # -- a. round trip ------------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_round_trip_keeps_body_headers_and_properties(self) -> None:
        queue = self.queue_name("rt")
        adapter = await self.open()
        properties: dict[str, Any] = {"correlation_id": "id-1", "reply_to": "reply-box"}
        if self.supports_priority:
            properties["priority"] = 5
        headers = {
            "task": "app.add", "id": "id-1", "retries": 3, "ignore_result": False,
            "flag": True, "shadow": None, "timelimit": [None, 30], "argsrepr": "(2, 3)",
            "stamps": {"a": [1, "b", None]}, "nested": {"k": {"n": 1, "ok": True}},
        }  # fmt: skip
        sent = [
            OutgoingMessage(
                body=b'[[2, 3], {}, {"callbacks": null}]',
                content_type="application/json",
                content_encoding="utf-8",
                headers=headers,
                properties=properties,
            ),
            OutgoingMessage(
                body=bytes(range(256)),
                content_type="application/x-msgpack",
                content_encoding="binary",
                headers={"id": "id-2", "n": -7},
                properties={"correlation_id": "id-2"},
            ),
        ]
        pump = self.consume(adapter, [queue], prefetch=10)
        for message in sent:
            await adapter.publish(queue, message)
        got = {d.body: d for d in await pump.take(2, self.redelivery_timeout, "round trip")}
        assert set(got) == {m.body for m in sent}, "bodies must come back byte for byte"
        for message in sent:
            delivery = got[message.body]
            assert (delivery.content_type, delivery.content_encoding) == (
                message.content_type, message.content_encoding
            )  # fmt: skip
            assert {k: delivery.headers.get(k, "<missing>") for k in message.headers} == dict(
                message.headers
            )
            assert {k: delivery.properties.get(k) for k in message.properties} == dict(
                message.properties
            )
            assert delivery.queue == queue
            assert delivery.redelivered is False
            assert delivery.envelope_error is None
            await adapter.settle(delivery, Ack())
        await self.wait_depth(adapter, queue, 0, 0, 0)

    # -- b. ack -------------------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_ack_removes_for_good(self) -> None:
        queue = self.queue_name("ack")
        adapter = await self.open(visibility_timeout=self.lease_s)
        await adapter.publish(queue, OutgoingMessage(body=b"ack-me"))
        pump = self.consume(adapter, [queue], prefetch=10)
        (delivery,) = await pump.take(1, self.redelivery_timeout, "ack")
        await adapter.settle(delivery, Ack())
        await pump.expect_quiet(
            self.lease_s * 1.5 + self.quiet_s, "an acknowledged message came back after the lease"
        )
        await self.wait_depth(adapter, queue, 0, 0, 0)

    # -- c. requeue ---------------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_requeue_now_and_after_a_delay(self) -> None:
        queue = self.queue_name("rq")
        adapter = await self.open()
        await adapter.publish(queue, OutgoingMessage(body=b"again"))
        pump = self.consume(adapter, [queue], prefetch=10)
        (first,) = await pump.take(1, self.redelivery_timeout, "first delivery")
        await adapter.settle(first, Requeue())
        (second,) = await pump.take(1, self.redelivery_timeout, "Requeue(0) must come back")
        assert second.body == b"again"

        started = time.monotonic()
        await adapter.settle(second, Requeue(delay_s=1.0))
        # parked on the broker, not held unacknowledged by this consumer
        await self.wait_depth(adapter, queue, ready=0, reserved=0, delayed=1)
        early = 0.9 - (time.monotonic() - started)
        if early > 0:
            await pump.expect_quiet(early, "Requeue(delay_s=1.0) came back too early")
        (third,) = await pump.take(1, 1.0 + self.redelivery_timeout, "Requeue(1.0) came back")
        assert time.monotonic() - started >= 0.9, "Requeue(delay_s=1.0) came back too early"
        assert third.body == b"again"
        await adapter.settle(third, Ack())
        await self.wait_depth(adapter, queue, 0, 0, 0)

    # -- d. dead letter -----------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_dead_letter_keeps_original_bytes_and_reason(self) -> None:
        queue = self.queue_name("dl")
        adapter = await self.open()
        body = b'[["\\u00e9t\\u00e9"], {}, {}]'
        await adapter.publish(queue, OutgoingMessage(body=body, headers={"id": "dl-1"}))
        pump = self.consume(adapter, [queue], prefetch=10)
        (delivery,) = await pump.take(1, self.redelivery_timeout, "dead letter")
        await adapter.settle(delivery, DeadLetter("unknown task 'app.nope'"))
        await self.eventually(
            lambda: self.dead_letters(adapter, queue),
            lambda letters: (body, "unknown task 'app.nope'") in letters,
            "the dead-letter destination should hold the original bytes and the reason",
        )
        await pump.expect_quiet(self.quiet_s, "a dead-lettered message was redelivered")
        await self.wait_depth(adapter, queue, 0, 0, 0)

    # -- e. crash -----------------------------------------------------------------------

    @pytest.mark.timeout(90)
    async def test_killed_consumer_loses_nothing(self) -> None:
        queue, held = self.queue_name("crash"), 5
        adapter = await self.open(visibility_timeout=self.lease_s)
        bodies = [f"crash-{i}".encode() for i in range(held + 3)]
        await self.publish_all(adapter, queue, bodies)
        if self.crash_mode == "process":
            taken = await self._take_in_killed_process(queue, held)
        else:
            taken = await self._take_in_abandoned_adapter(queue, held)
        assert len(set(taken)) == held, f"the crashed consumer should have held {held}: {taken}"

        # the survivor has the same short lease: acknowledge each message as it arrives
        pump = self.consume(adapter, [queue], prefetch=len(bodies))
        deadline = time.monotonic() + self.lease_s + self.redelivery_timeout
        got: list[Delivery] = []
        while len(got) < len(bodies):
            remaining = max(deadline - time.monotonic(), 0.0)
            (delivery,) = await pump.take(1, remaining, f"after {len(got)} of {len(bodies)}")
            await adapter.settle(delivery, Ack())
            got.append(delivery)
        assert sorted(d.body for d in got) == sorted(bodies), "nothing lost, nothing doubled"
        redelivered = {d.body for d in got if d.redelivered}
        assert set(taken) <= redelivered, "what the dead consumer held comes back redelivered"
        await pump.expect_quiet(self.quiet_s, "a message came back after all were acked")

    async def _take_in_killed_process(self, queue: str, count: int) -> list[bytes]:
        target, kwargs = self.adapter_spec(visibility_timeout=self.lease_s)
        spec = {"target": target, "kwargs": kwargs, "queue": queue, "count": count}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.adapters._crash_consumer",
            cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        taken: list[bytes] = []
        try:
            proc.stdin.write(json.dumps(spec).encode())
            proc.stdin.close()
            while len(taken) < count:
                line = await asyncio.wait_for(proc.stdout.readline(), self.redelivery_timeout + 15)
                if not line:
                    err = (await proc.stderr.read()).decode(errors="replace")
                    pytest.fail(f"the crash consumer exited after {len(taken)}:\n{err}")
                taken.append(bytes.fromhex(line.decode().strip()))
        finally:
            if proc.returncode is None:
                proc.kill()  # SIGKILL: no cleanup runs in the consumer
            await proc.wait()
        return taken

    async def _take_in_abandoned_adapter(self, queue: str, count: int) -> list[bytes]:
        victim = self.make_adapter(visibility_timeout=self.lease_s)
        await victim.connect()  # never closed: it dies holding its deliveries
        pump = Pump(victim, [queue], count)
        taken = await pump.take(count, self.redelivery_timeout, "the doomed consumer")
        await pump.stop()
        await self.crash_in_process(victim)
        return [d.body for d in taken]

    # -- f. lease renewal ---------------------------------------------------------------

    @pytest.mark.timeout(90)
    async def test_extended_lease_is_not_redelivered(self) -> None:
        queue, lease = self.queue_name("lease"), self.lease_s
        holder = await self.open(visibility_timeout=lease)
        other = await self.open(visibility_timeout=lease)
        await holder.publish(queue, OutgoingMessage(body=b"long task"))
        (delivery,) = await self.consume(holder, [queue], 1).take(1, self.redelivery_timeout)
        watcher = self.consume(other, [queue], prefetch=1)

        async def renew() -> None:
            for _ in range(9):  # every lease/3 for 3 leases
                await asyncio.sleep(lease / 3)
                await holder.extend(delivery, lease)

        renewing = asyncio.create_task(renew())
        await watcher.expect_quiet(3 * lease, "a delivery whose lease was renewed was redelivered")
        await renewing
        (back,) = await watcher.take(
            1, lease + self.redelivery_timeout, "once renewals stop, the lease must expire"
        )
        assert back.body == b"long task"
        assert back.redelivered is True
        await other.settle(back, Ack())

    # -- g. prefetch --------------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_prefetch_bounds_unsettled_deliveries(self) -> None:
        queue = self.queue_name("pf")
        adapter = await self.open()
        await self.publish_all(adapter, queue, [f"pf-{i}".encode() for i in range(200)])
        pump = self.consume(adapter, [queue], prefetch=10)
        first = await pump.take(10, self.redelivery_timeout, "prefetch=10")
        await pump.expect_quiet(self.quiet_s, "an 11th unsettled delivery with prefetch=10")
        await self.wait_depth(adapter, queue, ready=190, reserved=10, delayed=0)
        for delivery in first[:5]:
            await adapter.settle(delivery, Ack())
        await pump.take(5, self.redelivery_timeout, "settling 5 makes room for 5 more")
        await pump.expect_quiet(self.quiet_s, "more than 10 unsettled deliveries")
        await self.wait_depth(adapter, queue, ready=185, reserved=10, delayed=0)

    # -- h. depth -----------------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_depth_counts_ready_reserved_and_delayed(self) -> None:
        queue = self.queue_name("depth")
        adapter = await self.open()
        await self.publish_all(adapter, queue, [f"d-{i}".encode() for i in range(6)])
        pump = self.consume(adapter, [queue], prefetch=3)
        held = await pump.take(3, self.redelivery_timeout, "depth")
        await adapter.settle(held[0], Requeue(delay_s=60.0))
        await pump.take(1, self.redelivery_timeout, "a parked message frees its prefetch slot")
        await adapter.settle(held[1], Ack())
        await pump.take(1, self.redelivery_timeout, "an ack frees its prefetch slot")
        depth = await self.wait_depth(adapter, queue, ready=1, reserved=3, delayed=1)
        assert depth.total == 5
        assert depth.oldest_age_s is None or depth.oldest_age_s >= 0

    # -- i. close while busy ------------------------------------------------------------

    @pytest.mark.timeout(90)
    async def test_close_hands_back_everything_unsettled(self) -> None:
        queue, lease = self.queue_name("close"), max(60.0, 4 * self.redelivery_timeout)
        bodies = [f"c-{i:03d}".encode() for i in range(100)]
        busy = await self.open(visibility_timeout=lease)
        await self.publish_all(busy, queue, bodies)
        pump = self.consume(busy, [queue], prefetch=50)
        first = await pump.take(50, self.redelivery_timeout, "close while busy")
        for delivery in first[:10]:
            await busy.settle(delivery, Ack())
        await busy.close()
        await pump.finished(self.redelivery_timeout, "close() stops fetching")
        acked = {d.body for d in first[:10]}
        held = {d.body for d in pump.seen} - acked

        fresh = await self.open(visibility_timeout=lease)
        got = await self.consume(fresh, [queue], prefetch=100).take(
            90, self.redelivery_timeout, "close() hands back at once, not after the lease"
        )
        assert sorted(d.body for d in got) == sorted(set(bodies) - acked)
        assert held <= {d.body for d in got if d.redelivered}, "handed back = redelivered"
        await self.wait_depth(fresh, queue, ready=0, reserved=90, delayed=0)

    # -- j. malformed input -------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_malformed_item_is_delivered_for_dead_lettering(self) -> None:
        if type(self).push_raw is AdapterContract.push_raw:
            pytest.skip("this broker has no transport envelope to break (no push_raw hook)")
        queue = self.queue_name("raw")
        raw = "not an envelope { \u2603".encode()
        adapter = await self.open()
        await self.push_raw(queue, raw)
        (delivery,) = await self.consume(adapter, [queue], 10).take(1, self.redelivery_timeout)
        assert delivery.envelope_error, "an unwrappable item must say what is wrong"
        assert delivery.body == raw
        assert delivery.queue == queue
        await adapter.settle(delivery, DeadLetter("bad envelope"))
        await self.eventually(
            lambda: self.dead_letters(adapter, queue),
            lambda letters: (raw, "bad envelope") in letters,
            "the raw item should be dead-lettered as it was",
        )
        await self.wait_depth(adapter, queue, 0, 0, 0)

    # -- k. settle twice, settle after close ---------------------------------------------

    @pytest.mark.timeout(60)
    async def test_settle_twice_and_after_close_are_no_ops(self) -> None:
        queue = self.queue_name("noop")
        adapter = await self.open()
        await self.publish_all(adapter, queue, [b"one", b"two"])
        pump = self.consume(adapter, [queue], prefetch=2)
        got = {d.body: d for d in await pump.take(2, self.redelivery_timeout, "no-ops")}
        await adapter.settle(got[b"one"], Ack())
        await adapter.settle(got[b"one"], Ack())
        await adapter.settle(got[b"one"], Requeue())  # must not resurrect an acked message
        await adapter.close()
        await adapter.close()
        await adapter.settle(got[b"two"], Ack())  # handed back by close(): stays on the broker
        await adapter.extend(got[b"two"], 30.0)

        fresh = await self.open()
        watcher = self.consume(fresh, [queue], prefetch=10)
        (back,) = await watcher.take(1, self.redelivery_timeout, "the handed-back message")
        assert back.body == b"two"
        assert back.redelivered is True
        await watcher.expect_quiet(self.quiet_s, "a settled message came back")
        await fresh.settle(back, Ack())

    # -- l. several queues --------------------------------------------------------------

    @pytest.mark.timeout(60)
    async def test_one_iterator_consumes_several_queues(self) -> None:
        first, second = self.queue_name("qa"), self.queue_name("qb")
        adapter = await self.open()
        pump = self.consume(adapter, [first, second], prefetch=10)
        expected = {(q, f"{q}-{i}".encode()) for q in (first, second) for i in range(3)}
        for queue, body in sorted(expected):  # published while the iterator waits
            await adapter.publish(queue, OutgoingMessage(body=body))
        got = await pump.take(len(expected), self.redelivery_timeout, "two queues")
        assert {(d.queue, d.body) for d in got} == expected
        for delivery in got:
            await adapter.settle(delivery, Ack())

    # -- m. a healthy consumer never redelivers ---------------------------------------------

    @pytest.mark.timeout(120)
    async def test_a_healthy_consumer_never_redelivers(self) -> None:
        """A backlog taken a full prefetch at a time, finishing in bursts and out of order,
        with requeues and dead-letters among the acks: every message is delivered once (a
        requeued one once more), over several rounds. On AMQP a settle naming a tag that an
        earlier ``multiple`` ack covered closes the channel and redelivers everything else."""
        rng = random.Random(20261205)
        queue = self.queue_name("once")
        adapter = await self.open(visibility_timeout=60.0)
        prefetch, per_round, rounds = 25, 120, 3
        seen: dict[bytes, int] = {}
        requeued: set[bytes] = set()
        for round_no in range(rounds):
            bodies = [f"r{round_no}-{i}".encode() for i in range(per_round)]
            await self.publish_all(adapter, queue, bodies)  # a backlog before consuming
            pump = self.consume(adapter, [queue], prefetch)
            fates = {b: rng.choices(["ack", "requeue", "dead"], [90, 5, 5])[0] for b in bodies}
            expected = per_round + sum(1 for f in fates.values() if f == "requeue")
            running: list[asyncio.Task[None]] = []

            async def finish(delivery: Delivery, pause: float, fate: str) -> None:
                await asyncio.sleep(pause)  # the waves: many tasks end in the same tick
                if fate == "requeue" and delivery.body not in requeued:
                    requeued.add(delivery.body)
                    await adapter.settle(delivery, Requeue())
                elif fate == "dead":
                    await adapter.settle(delivery, DeadLetter("contract: burst"))
                else:
                    await adapter.settle(delivery, Ack())

            for _ in range(expected):
                (delivery,) = await pump.take(1, self.redelivery_timeout, "bursts")
                seen[delivery.body] = seen.get(delivery.body, 0) + 1
                if delivery.redelivered:
                    assert delivery.body in requeued, (
                        f"{delivery.body!r} came back redelivered though nothing failed"
                    )
                pause = rng.choice([0.0, 0.0, 0.01, 0.03, 0.06])
                running.append(asyncio.create_task(finish(delivery, pause, fates[delivery.body])))
            await asyncio.gather(*running)
            await pump.expect_quiet(self.quiet_s, "a settled message came back")
            await pump.stop()
        twice = sorted(b for b, n in seen.items() if n > 1 and b not in requeued)
        assert not twice, f"{len(twice)} messages were delivered twice: {twice[:5]}"
        assert all(seen[b] == 2 for b in requeued), "a requeued message comes back exactly once"
        await self.wait_depth(adapter, queue, 0, 0, 0)

    # -- n. hostile items never stop the stream ---------------------------------------------

    @pytest.mark.timeout(120)
    async def test_hostile_items_are_delivered_for_dead_lettering_and_never_stop_it(
        self,
    ) -> None:
        """Fuzz (seeded, ``fuzz_cases`` items): deep nesting, huge values, random bytes and
        mutated envelopes, with valid messages interleaved. The stream never stops, every
        item is delivered once, the valid ones intact, and the queue ends empty."""
        if type(self).push_raw is AdapterContract.push_raw:
            pytest.skip("this broker has no raw push hook")
        rng = random.Random(16)
        queue = self.queue_name("fuzz")
        adapter = await self.open()
        hostile = list(hostile_items(rng, self.fuzz_cases))
        valid = [f"valid-{i}".encode() for i in range(self.fuzz_cases // 4)]
        for i, raw in enumerate(hostile):
            await self.push_raw(queue, raw)
            if i % 4 == 0 and valid[i // 4 :]:
                await adapter.publish(queue, OutgoingMessage(body=valid[i // 4]))
        pump = self.consume(adapter, [queue], prefetch=20)
        got: list[Delivery] = []
        for _ in range(len(hostile) + len(valid)):
            (delivery,) = await pump.take(1, self.redelivery_timeout, "fuzz")
            got.append(delivery)
            if delivery.envelope_error is None and delivery.body in valid:
                await adapter.settle(delivery, Ack())
            else:
                await adapter.settle(delivery, DeadLetter(delivery.envelope_error or "fuzz"))
        await pump.expect_quiet(self.quiet_s, "a settled fuzz item came back")
        assert sorted(d.body for d in got if d.envelope_error is None and d.body in valid) == (
            sorted(valid)
        ), "every valid message arrives once, intact"
        flagged = [d for d in got if d.envelope_error is not None]
        assert all(d.body in hostile for d in flagged), "a flagged item keeps its original bytes"
        letters = await self.eventually(
            lambda: self.dead_letters(adapter, queue),
            lambda letters: len(letters) == len(hostile),
            "every hostile item is dead-lettered",
        )
        assert all(reason for _, reason in letters)
        await self.wait_depth(adapter, queue, 0, 0, 0)
