"""Printing and acknowledging what ``my-queue`` delivers.

A delivery is acked after its line is printed. A body that is not a JSON object is rejected
without requeue, which drops it: this queue has no dead-letter exchange (``svc`` has one).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel
    from pika.spec import Basic, BasicProperties

log = logging.getLogger(__name__)

# Enough of an undecodable body to recognise it, not enough to flood the terminal.
MAX_BODY_REPR = 80


def describe(event: dict[str, Any]) -> str:
    """Return the one-line summary printed for a received event."""
    line = f"received {event.get('type')} id={event.get('id')}"
    args = event.get("args")
    if isinstance(args, dict) and "user_id" in args:
        line += f" user_id={args['user_id']}"
    return line


def decode(body: bytes) -> dict[str, Any] | None:
    """Return the event in ``body``, or None when it is not a JSON object."""
    try:
        event = json.loads(body)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError both derive from it
        return None
    return event if isinstance(event, dict) else None


def on_message(channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties,
               body: bytes) -> None:
    """Print one delivery and settle it; called by pika from ``process_data_events``."""
    event = decode(body)
    if event is None:
        print(f"received undecodable body {body[:MAX_BODY_REPR]!r}", flush=True)
        log.warning("rejecting delivery %d: not a JSON object (content type %r)",
                    method.delivery_tag, properties.content_type)
        channel.basic_reject(method.delivery_tag, requeue=False)
        return
    print(describe(event), flush=True)
    channel.basic_ack(method.delivery_tag)
