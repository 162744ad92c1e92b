"""What each event type does, in a registry: adding a type is one decorated function.

A handler receives a decoded, de-duplicated event. It runs at most once per id when
de-duplication is on, except in the crash window the README describes (killed after handling,
before the record). A handler that raises is called again, after growing pauses, up to ``MAX_ATTEMPTS`` times in
all; after that its event goes to the dead-letter queue, so no event can loop forever.

The registry's keys are the only event types that ever become part of a metric name
(``<service>_<type>_ok``); every other type is counted under ``<service>_unknown_type``.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence

from svc.events import Event

log = logging.getLogger(__name__)

Handler = Callable[[Event], None]

# Pauses between attempts double from this, up to the cap.
FIRST_RETRY_PAUSE_SECONDS = 0.1
MAX_RETRY_PAUSE_SECONDS = 5.0

HANDLERS: dict[str, Handler] = {}
# A handled type becomes part of metric names (``<service>_<type>_ok``), so it must be a plain
# statsd and Graphite name; see svc.metrics.METRIC_NAME.
HANDLED_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def handles(event_type: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``event_type``."""

    def register(handler: Handler) -> Handler:
        if not HANDLED_TYPE.fullmatch(event_type):
            raise ValueError(
                f"event type {event_type!r} cannot have a handler: it names metrics, so it must "
                "be 1 to 64 of A-Z, a-z, 0-9, '_', '.', '-'"
            )
        if event_type in HANDLERS:
            raise ValueError(f"event type {event_type!r} already has a handler")
        HANDLERS[event_type] = handler
        return handler

    return register


def load_handler_modules(names: Sequence[str]) -> None:
    """Import the modules named in HANDLER_MODULES; their ``@handles`` functions register."""
    for name in names:
        importlib.import_module(name)
        log.info("loaded handlers from %s; handled types: %s", name, ", ".join(sorted(HANDLERS)))


@handles("new_order")
def new_order(event: Event) -> None:
    # The demo's work is the counter the consumer sends once this returns.
    log.debug("processing order %s", event.id)


@handles("ban_user")
def ban_user(event: Event) -> None:
    log.debug("banning user for event %s", event.id)


def run_handlers(
    handlers: Mapping[str, Handler], events: Sequence[Event], max_attempts: int
) -> dict[int, Exception]:
    """Handle each event, retrying failures; return the last error of each that never worked.

    The result maps an event's position in ``events`` to its last exception.
    """
    failures: dict[int, Exception] = {}
    for position, event in enumerate(events):
        handler = handlers[event.type]
        pause = FIRST_RETRY_PAUSE_SECONDS
        for attempt in range(1, max_attempts + 1):
            try:
                handler(event)
            except Exception as exc:  # any handler bug must not stop the daemon
                log.warning(
                    "handler %s failed on attempt %d of %d: %r",
                    event.type,
                    attempt,
                    max_attempts,
                    exc,
                    exc_info=attempt == max_attempts,
                )
                if attempt == max_attempts:
                    failures[position] = exc
                    break
                time.sleep(pause)
                pause = min(pause * 2, MAX_RETRY_PAUSE_SECONDS)
            else:
                break
    return failures
