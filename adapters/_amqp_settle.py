"""The settle stream of one AMQP channel: which frames to send so that no tag is settled twice.

RabbitMQ closes a channel (``PRECONDITION_FAILED - unknown delivery tag``) when an ack or nack
names a tag it no longer counts as unacknowledged, and then requeues everything else that was
unacked on that channel: tasks still running elsewhere in the process would run twice. A tag is
no longer unacknowledged once a frame settled it, including a ``basic.ack(multiple=True)``
naming a higher tag. So the frames of one channel must be decided by one owner, in order, from
an exact picture of what the broker still counts as unacknowledged.

``SettleLedger`` is that picture, and nothing else (no I/O, no asyncio): the session tells it
each tag the broker delivered and each settle the consumer decided; ``plan()`` turns the
decisions made since the last plan into frames and forgets the tags they settle. Frames of one
plan touch disjoint tags; frames of successive plans must reach the broker in plan order, which
the session guarantees by having a single writer send every plan's frames before the next plan
is made. With that, every frame names a tag the broker still holds, and a multiple ack covers
exactly the tags decided as acks (the lowest outstanding tags, up to the one it names):

- acks of the lowest outstanding tags, two or more in a row: one ``basic.ack(multiple=True)``;
- every other ack: a single ``basic.ack``; every requeue: a single ``basic.nack(requeue)``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

__all__ = ["Frame", "SettleLedger"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One settle frame: ``ack`` (``multiple``: every outstanding tag up to ``tag``) or
    ``nack`` (one tag, requeued)."""

    kind: Literal["ack", "nack"]
    tag: int
    multiple: bool = False


class SettleLedger:
    """What one channel's broker still counts as unacknowledged, and the settles decided."""

    __slots__ = ("_acks", "_heap", "_nacks", "_open")

    def __init__(self) -> None:
        self._open: set[int] = set()  # delivered, no frame sent that settles it
        self._heap: list[int] = []  # the same tags (and lazily, some already settled), min first
        self._acks: set[int] = set()  # decided since the last plan
        self._nacks: set[int] = set()

    def __len__(self) -> int:
        """How many tags the broker still counts as unacknowledged (decided ones included)."""
        return len(self._open)

    def delivered(self, tag: int) -> None:
        """The broker delivered ``tag`` (tags of a channel only grow)."""
        self._open.add(tag)
        heapq.heappush(self._heap, tag)

    def decide(self, tag: int, kind: Literal["ack", "nack"]) -> bool:
        """Decide how ``tag`` is settled; False (and nothing done) if it is not outstanding
        or already decided."""
        if tag not in self._open or tag in self._acks or tag in self._nacks:
            return False
        (self._acks if kind == "ack" else self._nacks).add(tag)
        return True

    @property
    def pending(self) -> bool:
        """Whether decisions wait for a plan."""
        return bool(self._acks or self._nacks)

    def plan(self) -> list[Frame]:
        """The frames for every decision since the last plan; their tags are forgotten."""
        frames: list[Frame] = []
        acks, heap, open_ = self._acks, self._heap, self._open
        covered, last = 0, 0
        while heap:
            low = heap[0]
            if low not in open_:  # settled by an earlier plan's single frame
                heapq.heappop(heap)
            elif low in acks:
                heapq.heappop(heap)
                acks.discard(low)
                open_.discard(low)
                covered, last = covered + 1, low
            else:
                break
        if covered:
            frames.append(Frame("ack", last, multiple=covered > 1))
        for tag in sorted(acks):
            frames.append(Frame("ack", tag))
        for tag in sorted(self._nacks):
            frames.append(Frame("nack", tag))
        open_.difference_update(acks)
        open_.difference_update(self._nacks)
        acks.clear()
        self._nacks.clear()
        return frames
