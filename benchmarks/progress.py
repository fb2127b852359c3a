"""A progress bar on stderr: tqdm when it is installed, else a one-line bar of our own."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``step(text)`` before each unit of work; ``close()`` at the end."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = -1
        self.started = time.monotonic()
        self._bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)

    def step(self, text: str) -> None:
        self.done += 1
        if self._bar is not None:
            if self.done:
                self._bar.update(1)
            self._bar.set_description_str(text[:48])
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.monotonic() - self.started
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
        line += f"{elapsed:5.0f}s  {text[:60]:<60}"
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(max(0, self.total - self._bar.n))
            self._bar.close()
            return
        self.done = self.total - 1
        self.step("done")
        sys.stderr.write("\n")
