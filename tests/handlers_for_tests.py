"""Event types for tests, loaded into the daemon with ``HANDLER_MODULES=tests.handlers_for_tests``.

The daemon imports this module at start (the tests put the repository root on PYTHONPATH), so
every ``@handles`` function below becomes an event type of that process:

- ``flaky_order``: raises on the first ``args.fail_times`` calls for an id, then succeeds;
- ``always_failing``: raises on every call;
- ``slow_order``: sleeps ``args.seconds`` before it returns.

Each one appends ``<id>`` to the file named by ``args.calls_file`` (or, if the event has none,
by the environment variable ``TEST_CALLS_FILE``) on every call, so a test can count how often
the daemon called it. The count lives in that file, not in memory: ``flaky_order`` keeps
counting across restarts of the daemon.
"""

from __future__ import annotations

import os
import time
from typing import Any

from svc.events import Event
from svc.handlers import handles

CALLS_FILE_VAR = "TEST_CALLS_FILE"


class InjectedFailure(RuntimeError):
    """Raised on purpose by a test handler; the daemon must retry, then dead-letter."""


def _args(event: Event) -> dict[str, Any]:
    return event.args if isinstance(event.args, dict) else {}


def _calls_file(event: Event) -> str | None:
    return _args(event).get("calls_file") or os.environ.get(CALLS_FILE_VAR) or None


def _record_call(event: Event) -> int:
    """Append this call to the calls file; return how many calls for this id it now holds."""
    path = _calls_file(event)
    if path is None:
        return 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event.id}\n".encode())
    finally:
        os.close(fd)
    with open(path, encoding="utf-8") as calls:
        return sum(line.rstrip("\n") == event.id for line in calls)


def read_calls(path: str | os.PathLike[str]) -> list[str]:
    """The ids of every call recorded in ``path``, in call order (for the tests' asserts)."""
    try:
        with open(path, encoding="utf-8") as calls:
            return [line.rstrip("\n") for line in calls]
    except FileNotFoundError:
        return []


@handles("flaky_order")
def flaky_order(event: Event) -> None:
    calls = _record_call(event)
    fail_times = int(_args(event).get("fail_times", 2))
    if calls <= fail_times:
        raise InjectedFailure(f"flaky_order {event.id}: failing call {calls} of {fail_times}")


@handles("always_failing")
def always_failing(event: Event) -> None:
    calls = _record_call(event)
    raise InjectedFailure(f"always_failing {event.id}: call {calls} fails like every other")


@handles("slow_order")
def slow_order(event: Event) -> None:
    _record_call(event)
    time.sleep(float(_args(event).get("seconds", 1.0)))
