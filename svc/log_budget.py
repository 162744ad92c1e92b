"""A cap on per-event log lines, so that a busy stream does not spend its time writing them.

Under load, one INFO line per event costs about as much as handling the event; the counters
and the summary line still count every event, so lines past the cap are only counted, and one
line a second says how many were left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

WINDOW_SECONDS = 1.0


class LineBudget:
    """Allows at most ``per_second`` lines in each second; 0 allows every line."""

    def __init__(self, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self._clock = clock
        self._window_start = clock()
        self._used = 0
        self._left_out = 0

    def allow(self) -> bool:
        """Whether one more line may be written now; counts it as left out if not."""
        if not self.per_second:
            return True
        self.tick()
        if self._used < self.per_second:
            self._used += 1
            return True
        self._left_out += 1
        return False

    def tick(self) -> None:
        """Start a new window once the current one is over, saying what it left out."""
        now = self._clock()
        elapsed = now - self._window_start
        if elapsed < WINDOW_SECONDS:
            return
        if self._left_out:
            log.info(
                "%d event lines left out in the last %.1f s (over LOG_EVENTS_PER_SECOND=%d); "
                "the counters and the summary line count every event",
                self._left_out,
                elapsed,
                self.per_second,
            )
        self._window_start = now
        self._used = self._left_out = 0
