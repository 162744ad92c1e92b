"""The exchange and queue example1 publishes to and consumes from, and how they are declared."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

log = logging.getLogger(__name__)

EXCHANGE = "events"
EXCHANGE_TYPE = "topic"
QUEUE = "my-queue"
# "#" matches every routing key, so the queue gets every event published to the exchange.
BINDING_KEY = "#"


def declare(channel: BlockingChannel) -> None:
    """Declare the exchange and the queue and bind them; a no-op when they already exist.

    Both are durable so that events published while nothing consumes survive a broker restart.
    The arguments must match those ``svc`` uses for ``events``: a mismatch closes the channel.
    """
    channel.exchange_declare(EXCHANGE, exchange_type=EXCHANGE_TYPE, durable=True)
    channel.queue_declare(QUEUE, durable=True)
    channel.queue_bind(QUEUE, EXCHANGE, routing_key=BINDING_KEY)
    log.info("declared exchange %s (%s), queue %s bound with %r",
             EXCHANGE, EXCHANGE_TYPE, QUEUE, BINDING_KEY)
