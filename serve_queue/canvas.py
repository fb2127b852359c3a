"""What follows a task: the canvas fields of a message (callbacks, chains, chords).

The dispatcher asks ``CanvasGuard.refusal(message)`` before anything runs. Today it refuses one
thing, loudly: a **chord header task** (a message whose embed carries ``chord``, the chord
body's signature; celery-wire-format.md §2.3, §8.8). Joining a chord means counting header
results on the result backend and sending the body after the last one, which serve_queue does
not do yet. Running the header anyway would leave the chord hanging forever with nothing said,
so instead:

- the header task is not run;
- FAILURE (``ChordNotSupported``) is stored for the header task and for the chord body, whose
  id is the one a Celery caller holds (``chord(...).apply_async().id``), so ``get()`` raises
  at once instead of hanging;
- the message is dead-lettered with reason ``chord-unsupported``, original bytes kept, so it
  can be replayed once chords are supported;
- a warning is logged once per chord (its group id), not once per header task.

Callbacks (``link``) and chain steps are sent by the dispatcher after success; ``link_error``
callbacks are logged and ignored there.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from serve_queue import results
from serve_queue.protocol import TaskMessage

__all__ = ["CHORD_UNSUPPORTED", "CanvasGuard", "ChordNotSupported", "Refusal"]

log = logging.getLogger("serve_queue.canvas")

#: the dead-letter reason kind of a refused chord header task
CHORD_UNSUPPORTED = "chord-unsupported"
#: how many chords' warnings are remembered (a bounded memory, not a leak)
_REMEMBERED_CHORDS = 4096


class ChordNotSupported(NotImplementedError):
    """Stored as the FAILURE of a chord's header tasks and body: chords do not run yet."""


@dataclass(frozen=True)
class Refusal:
    """Why a message is not run: the dead-letter ``kind``, the ``error`` that says it, and
    the FAILURE metas to store first, as ``(task_id, meta)`` pairs."""

    kind: str
    error: Exception
    failures: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class CanvasGuard:
    """Refuses what the canvas support cannot honour yet; warns once per chord."""

    def __init__(self) -> None:
        self._warned: OrderedDict[str, None] = OrderedDict()

    def refusal(self, message: TaskMessage) -> Refusal | None:
        """``None`` for a message that may run (every message without a chord)."""
        if message.chord is None:
            return None
        return self._refuse_chord(message, message.chord)

    def _refuse_chord(self, message: TaskMessage, body: dict[str, Any]) -> Refusal:
        options = body.get("options") or {}
        body_id = options.get("task_id") if isinstance(options, dict) else None
        chord_id = message.group_id or body_id or message.id
        body_name = body.get("task")
        error = ChordNotSupported(
            f"chords are not supported by serve_queue yet: header task {message.id} of chord "
            f"{chord_id} (body {body_name!r}) was not run; it was dead-lettered "
            f"({CHORD_UNSUPPORTED}) and can be replayed once chords are supported"
        )
        header = results.failure_meta(
            message.id,
            error,
            traceback=None,
            parent_id=message.parent_id,
            group_id=message.group_id,
        )
        failures = [(message.id, header)]
        if isinstance(body_id, str) and body_id:
            body_error = ChordNotSupported(
                f"chords are not supported by serve_queue yet: chord {chord_id} will not call "
                f"its body {body_name!r}; its header tasks were dead-lettered ({CHORD_UNSUPPORTED})"
            )
            failures.append((body_id, results.failure_meta(body_id, body_error, traceback=None)))
        self._warn_once(chord_id, message, body_name)
        return Refusal(CHORD_UNSUPPORTED, error, failures)

    def _warn_once(self, chord_id: str, message: TaskMessage, body_name: Any) -> None:
        if chord_id in self._warned:
            self._warned.move_to_end(chord_id)
            log.debug("chord %s: header task %s refused too", chord_id, message.id)
            return
        self._warned[chord_id] = None
        if len(self._warned) > _REMEMBERED_CHORDS:
            self._warned.popitem(last=False)
        log.warning(
            "chord %s (body %r): chords are not supported yet; its header tasks (first: %s, %s) "
            "are not run, FAILURE is stored for them and the body, and they are dead-lettered "
            "with reason %s",
            chord_id,
            body_name,
            message.id,
            message.name,
            CHORD_UNSUPPORTED,
        )
