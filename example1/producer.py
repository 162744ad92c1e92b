"""Building ``new_order`` events and publishing them to the ``events`` exchange."""

from __future__ import annotations

import json
import logging
import random
import uuid
from typing import TYPE_CHECKING, Any

import pika

from example1.topology import EXCHANGE

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

log = logging.getLogger(__name__)

NEW_ORDER = "new_order"
MAX_USER_ID = 1_000_000
# Persistent, like plumber's messages: a durable queue keeps them across a broker restart.
PERSISTENT = 2  # AMQP delivery mode 2; pika.DeliveryMode.Persistent in pika >= 1.3


def make_new_order() -> dict[str, Any]:
    """Return a ``new_order`` event with a fresh id and a random user id."""
    return {
        "type": NEW_ORDER,
        "id": str(uuid.uuid4()),
        "args": {"user_id": random.randint(1, MAX_USER_ID)},
    }


def publish(channel: BlockingChannel, event: dict[str, Any]) -> None:
    """Publish ``event`` with its type as the routing key, then print it.

    With publisher confirms on (``channel.confirm_delivery()``) this returns only once the broker
    has taken the message, so "published" is printed for events that really are in the queue.
    """
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=event["id"],
        app_id="example1",
    )
    body = json.dumps(event).encode()
    channel.basic_publish(EXCHANGE, event["type"], body, properties)
    print(f"published {event['type']} id={event['id']} user_id={event['args']['user_id']}",
          flush=True)
