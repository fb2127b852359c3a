"""The settle order of one AMQP channel (issue 10): no tag settled twice, none after a
``multiple`` ack covered it, on any interleaving of deliveries, acks, requeues and flushes.

``StrictBroker`` models RabbitMQ's channel: an ack or nack of a tag it does not hold is
``PRECONDITION_FAILED - unknown delivery tag`` (the channel closes and everything unacked on it
is redelivered); ``basic.ack(multiple=True)`` settles every held tag up to the one it names.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_queue.adapters._amqp_session import ConsumeSession
from serve_queue.adapters._amqp_settle import Frame, SettleLedger


class UnknownTag(AssertionError):
    """What RabbitMQ answers with PRECONDITION_FAILED (and a closed channel)."""


class StrictBroker:
    def __init__(self) -> None:
        self.held: set[int] = set()
        self.settled: dict[int, str] = {}

    def deliver(self, tag: int) -> None:
        self.held.add(tag)

    def apply(self, frame: Frame) -> None:
        if frame.tag not in self.held:
            raise UnknownTag(f"unknown delivery tag {frame.tag} ({frame})")
        covered = [t for t in self.held if t <= frame.tag] if frame.multiple else [frame.tag]
        for tag in covered:
            self.held.discard(tag)
            self.settled[tag] = frame.kind


# one step: ("deliver",), ("ack", i), ("nack", i) (i picks among the undecided), ("flush",)
steps = st.lists(
    st.one_of(
        st.just(("deliver", 0)),
        st.tuples(st.sampled_from(["ack", "nack"]), st.integers(0, 10_000)),
        st.just(("flush", 0)),
    ),
    max_size=200,
)


@settings(max_examples=400, deadline=None)
@given(steps)
def test_every_plan_is_valid_for_a_strict_broker(script: list[tuple[str, int]]) -> None:
    ledger, broker = SettleLedger(), StrictBroker()
    undecided: list[int] = []
    decided: dict[int, str] = {}
    next_tag = 1

    def flush() -> None:
        for frame in ledger.plan():
            broker.apply(frame)

    for action, pick in script:
        if action == "deliver":
            ledger.delivered(next_tag)
            broker.deliver(next_tag)
            undecided.append(next_tag)
            next_tag += 1
        elif action == "flush":
            flush()
        elif undecided:
            tag = undecided.pop(pick % len(undecided))
            assert ledger.decide(tag, "ack" if action == "ack" else "nack")
            decided[tag] = action
            assert not ledger.decide(tag, "ack"), "a tag is decided once"
    flush()
    assert broker.settled == decided, "each tag settled exactly as decided, once"
    assert broker.held == set(undecided)
    assert len(ledger) == len(undecided)


def test_the_lowest_acked_tags_go_out_as_one_multiple_ack() -> None:
    ledger = SettleLedger()
    for tag in range(1, 8):
        ledger.delivered(tag)
    for tag in (1, 2, 3, 5, 7):
        ledger.decide(tag, "ack")
    ledger.decide(6, "nack")
    assert ledger.plan() == [
        Frame("ack", 3, multiple=True),
        Frame("ack", 5),
        Frame("ack", 7),
        Frame("nack", 6),
    ]
    ledger.decide(4, "ack")
    assert ledger.plan() == [Frame("ack", 4)], "5..7 were settled: 4 alone"


class SlowChannel:
    """aiormq's channel as the session uses it, with writes that take random time, checked
    frame by frame against a strict broker in the order they are written."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.broker = StrictBroker()
        self.closing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.writes: asyncio.Lock = asyncio.Lock()  # one socket: frames leave in call order
        self.order: list[Frame] = []

    async def _write(self, frame: Frame, wait: bool) -> None:
        self.order.append(frame)  # queued on the connection's writer, as aiormq does
        self.broker.apply(frame)
        if wait or self.rng.random() < 0.3:
            await asyncio.sleep(self.rng.choice([0, 0, 0.0005, 0.002]))

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await self._write(Frame("ack", tag, multiple), wait)

    async def basic_nack(self, tag: int, requeue: bool = True, wait: bool = True) -> None:
        await self._write(Frame("nack", tag), wait)


class Message:
    def __init__(self, tag: int) -> None:
        self.delivery_tag = tag
        self.consumer_tag = "c"
        self.routing_key = "q"


@pytest.mark.parametrize("seed", range(12))
async def test_concurrent_settles_of_a_session_never_name_a_settled_tag(seed: int) -> None:
    """Hundreds of tasks settling in bursts through the real ``ConsumeSession``, with channel
    writes that suspend at random: every frame is valid and each tag settled as decided."""
    rng = random.Random(seed)
    channel = SlowChannel(rng)
    session = ConsumeSession(
        object(),  # type: ignore[arg-type]
        channel,  # type: ignore[arg-type]
        prefetch=10_000, lease=None, generation=1,
    )  # fmt: skip
    tags = list(range(1, 401))
    for tag in tags:
        channel.broker.deliver(tag)
        await session._on_message(Message(tag))  # type: ignore[arg-type]
        await session.next()
    decided = {tag: rng.choices(["ack", "nack"], [9, 1])[0] for tag in tags}

    async def finish(tag: int) -> None:
        await asyncio.sleep(rng.choice([0, 0, 0.001, 0.003, 0.01]))
        await (session.ack(tag) if decided[tag] == "ack" else session.nack(tag))

    await asyncio.gather(*(finish(tag) for tag in rng.sample(tags, len(tags))))
    assert channel.broker.settled == decided
    assert not channel.broker.held
