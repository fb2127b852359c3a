"""The in-memory adapter: the shared contract, then what only it has (fault injection, options)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from serve_queue.adapters import open_adapter
from serve_queue.errors import BrokerError, BrokerUnavailable, ConfigurationError
from serve_queue.testing import MemoryAdapter, MemoryBroker
from serve_queue.types import Ack, BrokerAdapter, DeadLetter, OutgoingMessage, Requeue
from tests.adapters.contract import AdapterContract, Pump


class TestMemoryContract(AdapterContract):
    crash_mode = "abandon"
    lease_s = 0.3
    redelivery_timeout = 2.0
    quiet_s = 0.1
    depth_timeout = 1.0

    @pytest.fixture(autouse=True)
    def _broker(self) -> None:
        self.broker = MemoryBroker("contract")

    def make_adapter(self, **overrides: Any) -> BrokerAdapter:
        return MemoryAdapter("memory://contract", broker=self.broker, **overrides)

    async def dead_letters(self, adapter: BrokerAdapter, queue: str) -> list[tuple[bytes, str]]:
        return [(d.body, d.reason) for d in self.broker.dead_letters(f"{queue}.dlq")]

    async def push_raw(self, queue: str, raw: bytes) -> None:
        self.broker.faults.push_malformed(queue, raw)

    async def crash_in_process(self, adapter: BrokerAdapter) -> None:
        assert isinstance(adapter, MemoryAdapter)
        self.broker.faults.crash(adapter)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker("unit")


Consume = Callable[[BrokerAdapter, Sequence[str], int], Pump]


@pytest.fixture
async def consume() -> AsyncIterator[Consume]:
    """Start a ``Pump`` on an adapter's deliveries; every pump is stopped after the test."""
    pumps: list[Pump] = []

    def start(adapter: BrokerAdapter, queues: Sequence[str], prefetch: int) -> Pump:
        pumps.append(Pump(adapter, queues, prefetch))
        return pumps[-1]

    yield start
    for pump in pumps:
        await pump.stop()


async def connected(broker: MemoryBroker, **options: Any) -> MemoryAdapter:
    adapter = broker.adapter(**options)
    await adapter.connect()
    return adapter


def message(body: bytes, priority: int | None = None) -> OutgoingMessage:
    props = {} if priority is None else {"priority": priority}
    return OutgoingMessage(body=body, properties=props)


# -- construction and sharing -------------------------------------------------------------


async def test_each_adapter_without_a_broker_gets_a_private_one() -> None:
    one, two = MemoryAdapter("memory://same"), MemoryAdapter("memory://same")
    await one.connect()
    await two.connect()
    await one.publish("q", message(b"x"))
    assert (await two.depth("q")).total == 0
    assert (await one.depth("q")).ready == 1


async def test_open_adapter_builds_it_from_the_scheme_table(broker: MemoryBroker) -> None:
    adapter = open_adapter("memory://unit", broker=broker, visibility_timeout=5.0)
    assert isinstance(adapter, MemoryAdapter)
    assert adapter.broker is broker
    assert adapter.visibility_timeout == 5.0


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis://localhost", {}),
        ("memory://x", {"visibility_timeout": 0}),
        ("memory://x", {"dead_letter_queue": "{nope}.dlq"}),
    ],
)
def test_bad_options_are_configuration_errors(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        MemoryAdapter(url, **options)


async def test_use_before_connect_is_an_error(broker: MemoryBroker) -> None:
    adapter = broker.adapter()
    with pytest.raises(BrokerError, match="connect"):
        await adapter.publish("q", message(b"x"))
    with pytest.raises(BrokerError, match="connect"):
        await adapter.deliveries(["q"], 1).__anext__()
    await adapter.connect()
    with pytest.raises(ConfigurationError):
        await adapter.deliveries(["q"], 0).__anext__()


# -- ordering and dead letters ------------------------------------------------------------


async def test_higher_priority_first_then_fifo(broker: MemoryBroker, consume: Consume) -> None:
    adapter = await connected(broker)
    for body, priority in [(b"low-1", 0), (b"high", 9), (b"low-2", None), (b"mid", 5)]:
        await adapter.publish("q", message(body, priority))
    got = await consume(adapter, ["q"], 10).take(4, 1.0)
    assert [d.body for d in got] == [b"high", b"mid", b"low-1", b"low-2"]


async def test_dead_letter_queue_is_a_queue_with_the_reason(
    broker: MemoryBroker, consume: Consume
) -> None:
    adapter = await connected(broker, dead_letter_queue="dead.{queue}")
    await adapter.publish("q", OutgoingMessage(body=b"bad", headers={"id": "1"}))
    (delivery,) = await consume(adapter, ["q"], 1).take(1, 1.0)
    await adapter.settle(delivery, DeadLetter("no such task"))
    (letter,) = broker.dead_letters("dead.q")
    assert (letter.body, letter.reason, letter.queue) == (b"bad", "no such task", "q")
    (again,) = await consume(adapter, ["dead.q"], 1).take(1, 1.0)
    assert again.body == b"bad"
    assert again.headers["id"] == "1"
    assert again.headers["x-dead-letter-reason"] == "no such task"


# -- fault injection ----------------------------------------------------------------------


async def test_duplicate_next_delivers_a_message_twice(
    broker: MemoryBroker, consume: Consume
) -> None:
    adapter = await connected(broker)
    await adapter.publish("q", message(b"once"))
    broker.faults.duplicate_next()
    first, second = await consume(adapter, ["q"], 10).take(2, 1.0)
    assert (first.body, first.redelivered) == (b"once", False)
    assert (second.body, second.redelivered) == (b"once", True)
    await adapter.settle(first, Ack())
    await adapter.settle(second, Ack())
    assert broker.depth("q").total == 0


async def test_expired_lease_redelivers_and_the_late_settle_is_a_no_op(
    broker: MemoryBroker, consume: Consume
) -> None:
    adapter = await connected(broker)
    await adapter.publish("q", message(b"slow"))
    pump = consume(adapter, ["q"], 10)
    (first,) = await pump.take(1, 1.0)
    assert broker.faults.expire_leases("q") == 1
    (second,) = await pump.take(1, 1.0)
    assert (second.body, second.redelivered) == (b"slow", True)
    await adapter.settle(first, Requeue())  # its lease is gone: nothing happens
    assert (broker.depth("q").ready, broker.depth("q").reserved) == (0, 1)
    assert broker.faults.redeliver(second) is True
    assert broker.faults.redeliver(second) is False
    (third,) = await pump.take(1, 1.0)
    assert third.redelivered is True


async def test_crashed_consumer_abandons_its_deliveries(
    broker: MemoryBroker, consume: Consume
) -> None:
    victim = await connected(broker, visibility_timeout=60.0)
    survivor = await connected(broker)
    await victim.publish("q", message(b"mid-task"))
    (held,) = await consume(victim, ["q"], 1).take(1, 1.0)
    watcher = consume(survivor, ["q"], 1)
    await watcher.expect_quiet(0.05, "the victim still holds its lease")
    assert broker.faults.crash(victim, expire_leases=True) == 1
    (back,) = await watcher.take(1, 1.0)
    assert (back.body, back.redelivered) == (b"mid-task", True)
    await victim.settle(held, Ack())  # a dead process acknowledges nothing
    assert broker.depth("q").reserved == 1
    for call in (victim.connect(), victim.publish("q", message(b"x"))):
        with pytest.raises(BrokerUnavailable, match="crashed"):
            await call


async def test_crash_without_expiry_waits_for_the_lease(
    broker: MemoryBroker, consume: Consume
) -> None:
    victim = await connected(broker, visibility_timeout=0.2)
    await victim.publish("q", message(b"m"))
    pump = consume(victim, ["q"], 1)
    await pump.take(1, 1.0)
    broker.faults.crash(victim)
    error = await pump.ended(1.0, "a crashed adapter's iterator")
    assert isinstance(error, BrokerUnavailable)
    survivor = await connected(broker)
    (back,) = await consume(survivor, ["q"], 1).take(1, 2.0)
    assert back.redelivered is True


async def test_outage_fails_every_call_and_wakes_waiting_consumers(
    broker: MemoryBroker, consume: Consume
) -> None:
    adapter = await connected(broker)
    pump = consume(adapter, ["q"], 1)
    await pump.expect_quiet(0.02, "empty queue")
    with broker.faults.outage():
        assert broker.faults.down
        with pytest.raises(BrokerUnavailable):
            await adapter.publish("q", message(b"x"))
        with pytest.raises(BrokerUnavailable):
            await adapter.depth("q")
        with pytest.raises(BrokerUnavailable):
            await broker.adapter().connect()
        await asyncio.sleep(0)  # let the waiting iterator see the outage
        await asyncio.sleep(0)
        assert isinstance(pump.error, BrokerUnavailable)
    await adapter.publish("q", message(b"after"))
    (delivery,) = await consume(adapter, ["q"], 1).take(1, 1.0)
    assert delivery.body == b"after"


async def test_timed_outage_ends_by_itself(broker: MemoryBroker) -> None:
    adapter = await connected(broker)
    broker.faults.go_down(duration_s=0.05)
    with pytest.raises(BrokerUnavailable):
        await adapter.publish("q", message(b"x"))
    await asyncio.sleep(0.06)
    await adapter.publish("q", message(b"x"))
    assert broker.depth("q").ready == 1


async def test_settle_during_an_outage_fails_and_keeps_the_delivery(
    broker: MemoryBroker, consume: Consume
) -> None:
    adapter = await connected(broker)
    await adapter.publish("q", message(b"m"))
    (delivery,) = await consume(adapter, ["q"], 1).take(1, 1.0)
    broker.faults.go_down()
    with pytest.raises(BrokerUnavailable):
        await adapter.settle(delivery, Ack())
    await adapter.close()  # cannot hand back while down: the lease will bring it back
    broker.faults.restore()
    assert broker.depth("q").reserved == 1
    broker.faults.expire_leases()
    assert broker.depth("q").ready == 1


async def test_fail_publishes_fails_the_next_n(broker: MemoryBroker) -> None:
    adapter = await connected(broker)
    broker.faults.fail_publishes(2)
    for _ in range(2):
        with pytest.raises(BrokerUnavailable, match="injected"):
            await adapter.publish("q", message(b"lost"))
    await adapter.publish("q", message(b"kept"))
    assert broker.depth("q").ready == 1


async def test_fail_next_settle_then_retry_succeeds(broker: MemoryBroker, consume: Consume) -> None:
    adapter = await connected(broker)
    await adapter.publish("q", message(b"m"))
    (delivery,) = await consume(adapter, ["q"], 1).take(1, 1.0)
    broker.faults.fail_next("settle")
    with pytest.raises(BrokerUnavailable):
        await adapter.settle(delivery, Ack())
    await adapter.settle(delivery, Ack())
    assert broker.depth("q").total == 0
    with pytest.raises(ValueError, match="unknown operation"):
        broker.faults.fail_next("teleport")
