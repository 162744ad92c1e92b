"""What each event type does, in a registry: adding a type is one decorated function.

A handler receives a decoded, de-duplicated event. It runs at most once per id when
de-duplication is on, except in the crash window the README describes (killed after handling,
before the record). A handler that raises sends its event to the dead-letter queue.

The registry's keys are the only event types that ever become part of a metric name
(``<service>_<type>_ok``); every other type is counted under ``<service>_unknown_type``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from svc.events import Event

log = logging.getLogger(__name__)

Handler = Callable[[Event], None]

HANDLERS: dict[str, Handler] = {}


def handles(event_type: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of ``event_type``."""

    def register(handler: Handler) -> Handler:
        if event_type in HANDLERS:
            raise ValueError(f"event type {event_type!r} already has a handler")
        HANDLERS[event_type] = handler
        return handler

    return register


@handles("new_order")
def new_order(event: Event) -> None:
    # The demo's work is the counter the consumer sends once this returns.
    log.debug("processing order %s", event.id)


@handles("ban_user")
def ban_user(event: Event) -> None:
    log.debug("banning user for event %s", event.id)
