"""How long the next messages of a Redis queue have waited: the heads of its priority lists.

Producers LPUSH and consumers take from the right, so the item at index -1 of each priority
list (``LINDEX key -1``, no message taken) is the next one delivered from that list. kombu's
envelope carries no send time; the serve_queue producer stamps one in the envelope's
properties, ``"timestamp"``: seconds since the epoch, a float (kombu and Celery carry unknown
properties along and ignore them). A stamped head is ``now - timestamp`` old (by the
producer's clock, so clock skew between machines shows; never below 0).

A head without a usable stamp (sent by Celery or another kombu producer, a retry or follow-up
published by a consumer, a malformed item) falls back to ``HeadClock``: the time since this
adapter first saw that very item at the head of its list. That is a lower bound of its age,
``None`` the first time (an adapter that looks once, as the autoscaling policy's fresh one
does, learns nothing of unstamped heads), growing for as long as the item waits.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping

__all__ = ["STAMP", "HeadClock", "sent_at"]

STAMP = "timestamp"
_UNDECODABLE = (ValueError, RecursionError, MemoryError)


def sent_at(item: bytes) -> float | None:
    """The producer's stamp of a list item (epoch seconds), ``None`` if it has none."""
    try:
        envelope = json.loads(item.decode("utf-8"))
    except _UNDECODABLE:
        return None
    properties = envelope.get("properties") if isinstance(envelope, dict) else None
    value = properties.get(STAMP) if isinstance(properties, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class HeadClock:
    """The age of the oldest head over a queue's lists, unstamped heads timed from first sight."""

    def __init__(self) -> None:
        #: list key -> (digest of its unstamped head, monotonic time it was first seen there)
        self._first_seen: dict[str, tuple[bytes, float]] = {}

    def oldest(self, heads: Mapping[str, bytes | None], *, now: float, mono: float) -> float | None:
        """The largest age among ``heads`` (list key -> item at index -1, ``None`` if empty);
        ``now`` is ``time.time()``, ``mono`` is ``time.monotonic()``."""
        ages = [self._age(key, item, now, mono) for key, item in heads.items()]
        return max((age for age in ages if age is not None), default=None)

    def _age(self, key: str, item: bytes | None, now: float, mono: float) -> float | None:
        stamp = None if item is None else sent_at(item)
        if item is None or stamp is not None:
            self._first_seen.pop(key, None)
            return None if stamp is None else max(now - stamp, 0.0)
        digest = hashlib.blake2b(item, digest_size=16).digest()
        seen = self._first_seen.get(key)
        if seen is None or seen[0] != digest:
            self._first_seen[key] = (digest, mono)
            return None
        return mono - seen[1]
