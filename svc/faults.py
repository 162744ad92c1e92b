"""Test-only instruments for proving the crash guarantees; both are off unless set.

``TEST_CRASH_AT=<point>`` makes the process SIGKILL itself the first time it reaches the named
point, so a test can restart it and check what the crash cost. ``TEST_HANDLED_LOG=<path>``
appends one line ``<service> <id>`` per handled event, written before the id is recorded in
etcd, so a chaos run can count handled events without relying on UDP metrics. An id's backslashes,
line feeds and carriage returns are written as ``\\\\``, ``\\n`` and ``\\r``, so an id can
never add a line of its own.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable

log = logging.getLogger(__name__)


class CrashPoint:
    """Kills the process at one named point, or does nothing when ``point`` is None."""

    def __init__(self, point: str | None) -> None:
        self.point = point

    def reached(self, point: str) -> None:
        if point == self.point:
            log.warning("TEST_CRASH_AT=%s reached: killing this process with SIGKILL", point)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


class HandledLog:
    """An append-only journal of handled ids; a no-op when ``path`` is None."""

    def __init__(self, service: str, path: str | None) -> None:
        self.service = service
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    def write(self, event_ids: Iterable[str]) -> None:
        if self._fd is None:
            return
        lines = "".join(f"{self.service} {escape_line(event_id)}\n" for event_id in event_ids)
        # One write(2) per batch: once it returns, the lines survive a SIGKILL of this process.
        if lines:
            os.write(self._fd, lines.encode("utf-8", "backslashreplace"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def escape_line(text: str) -> str:
    """``text`` on one line: backslash, line feed and carriage return escaped with a backslash."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
