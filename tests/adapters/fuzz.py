"""Hostile transport items for the adapters' fuzz tests (issue 16): seeded, bounded, varied.

``hostile_items(rng, count)`` mixes random bytes, deep nesting (past every JSON decoder's
limit), huge values, and structural mutations of a valid kombu envelope (every field removed,
or replaced by a value of the wrong type). Each item is distinct (a serial number is woven in)
so a test can tell which came back.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from typing import Any

__all__ = ["hostile_items", "valid_envelope"]

_WRONG: list[Any] = [None, True, 0, -1, 2**70, 1.5e308, "", "x" * 300, [], [1, [2]], {}, {"a": {}}]


def valid_envelope(serial: int) -> dict[str, Any]:
    body = json.dumps([[serial], {}, {"callbacks": None}]).encode()
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "fuzz.noop", "id": f"fuzz-{serial}", "lang": "py"},
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": "q"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": f"tag-{serial}",
        },
    }


def _deep(depth: int, serial: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + str(serial).encode() + b"]" * depth
    return b'{"a":' * depth + str(serial).encode() + b"}" * depth


def _mutated(rng: random.Random, serial: int) -> bytes:
    envelope = valid_envelope(serial)
    path: list[str] = [rng.choice(list(envelope))]
    holder: Any = envelope
    if isinstance(envelope[path[0]], dict) and rng.random() < 0.6:
        holder = envelope[path[0]]
        path.append(rng.choice(list(holder)))
    key = path[-1]
    if rng.random() < 0.25:
        del holder[key]
    elif rng.random() < 0.2:
        nested: Any = serial
        for _ in range(rng.choice([1100, 3000])):
            nested = {"a": nested}
        holder[key] = nested
    else:
        holder[key] = rng.choice(_WRONG)
    envelope["serial"] = serial
    try:
        return json.dumps(envelope).encode()
    except RecursionError:  # json.dumps cannot write it either: splice the text by hand
        return (
            json.dumps({"serial": serial, "properties": None}).encode()[:-1]
            + b', "x": '
            + (_deep(3000, serial, "dict") + b"}")
        )


def hostile_items(rng: random.Random, count: int) -> Iterator[bytes]:
    """``count`` distinct items, none of them a valid envelope of a runnable task."""
    makers = [
        lambda s: _deep(5000, s, "dict"),
        lambda s: _deep(5000, s, "list"),
        lambda s: _deep(rng.randint(900, 1200), s, rng.choice(["list", "dict"])),
        lambda s: b"%d:" % s + rng.randbytes(rng.randint(0, 200)),
        lambda s: b'{"serial": %d, "body": "%s"}' % (s, b"A" * rng.randint(1, 300_000)),
        lambda s: b"[%d, %s]" % (s, b"9" * rng.randint(5000, 20000)),
        lambda s: b"\xff\xfe%d" % s,
        lambda s: json.dumps([s, "not an object"]).encode(),
        lambda s: _mutated(rng, s),
        lambda s: _mutated(rng, s),
        lambda s: _mutated(rng, s),
    ]
    for serial in range(count):
        yield rng.choice(makers)(serial)
