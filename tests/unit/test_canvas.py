"""Canvas fields: a chord header task is refused loudly, once per chord, with FAILUREs a
caller can read for the header and for the chord body. (End to end with a real Celery chord on
Redis: tests/interop/test_canvas_celery.py.)"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from serve_queue import protocol, results
from serve_queue.canvas import CHORD_UNSUPPORTED, CanvasGuard, ChordNotSupported
from serve_queue.protocol import TaskMessage
from tests.unit.fixtures_util import producer_messages

BY_LABEL = {captured.label: captured for captured in producer_messages()}


def decoded(case: str, index: int = 0, transport: str = "amqp") -> TaskMessage:
    return protocol.decode(BY_LABEL[f"{transport}-{case}-{index}"].delivery)


def test_a_message_without_a_chord_may_run() -> None:
    guard = CanvasGuard()
    for case in ("send_task_basic", "chain", "protocol1_link"):
        assert guard.refusal(decoded(case)) is None, case


def test_a_chord_header_is_refused_with_failures_for_it_and_the_body() -> None:
    header = decoded("chord", 0)
    assert header.chord is not None
    body_id = header.chord["options"]["task_id"]
    refusal = CanvasGuard().refusal(header)
    assert refusal is not None
    assert refusal.kind == CHORD_UNSUPPORTED == "chord-unsupported"
    assert isinstance(refusal.error, ChordNotSupported)
    assert isinstance(refusal.error, NotImplementedError)
    assert "chords are not supported by serve_queue yet" in str(refusal.error)
    assert [task_id for task_id, _ in refusal.failures] == [header.id, body_id]
    for task_id, meta in refusal.failures:
        assert meta["task_id"] == task_id
        assert meta["status"] == results.FAILURE
        assert meta["result"]["exc_type"] == "ChordNotSupported"
        assert meta["result"]["exc_module"] == "serve_queue.canvas"
        assert "not supported" in meta["result"]["exc_message"][0]
    assert refusal.failures[0][1]["group_id"] == header.group_id


def test_the_warning_comes_once_per_chord(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="serve_queue.canvas")
    guard = CanvasGuard()
    first, second = decoded("chord", 0), decoded("chord", 1)
    other = dataclasses.replace(first, group_id="another-chord")
    for message in (first, second, first, other):
        assert guard.refusal(message) is not None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert first.group_id in warnings[0].getMessage()
    assert "another-chord" in warnings[1].getMessage()
    assert "chord-unsupported" in warnings[0].getMessage()
