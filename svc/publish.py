"""``python -m svc.publish``: publish test events, for people without plumber.

Messages are persistent and published with confirms and the mandatory flag, so the command
says so when the broker did not take a message or when no queue was bound to receive it (an
event published before any service declared its queue is otherwise silently dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import uuid

import pika
import pika.exceptions

from svc.config import RABBIT_CA_FILE, RABBIT_CERT_FILE, RABBIT_KEY_FILE, read_tls_files
from svc.errors import ConfigError
from svc.tls import broker_parameters, client_context

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m svc.publish", description=__doc__)
    parser.add_argument(
        "event",
        nargs="?",
        default=None,
        help='the event as JSON, e.g. \'{"type":"new_order","id":"123"}\' '
        "(default: a new_order with a fresh id)",
    )
    parser.add_argument("--url", default=os.environ.get("RABBIT_URL", DEFAULT_URL))
    parser.add_argument("--exchange", default="events")
    parser.add_argument("--routing-key", default="foo")
    parser.add_argument("--count", type=int, default=1, help="publish the event this many times")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.event is None:
        body = json.dumps({"type": "new_order", "id": uuid.uuid4().hex}).encode()
    else:
        try:
            json.loads(args.event)
        except ValueError as exc:
            # Sent anyway: a malformed body is a fair test of the dead-letter queue.
            print(f"note: the event is not valid JSON ({exc}); publishing it as is")
        body = args.event.encode()
    try:
        # The service's TLS settings, so an amqps:// --url verifies the broker the same way.
        tls = read_tls_files(os.environ, RABBIT_CA_FILE, RABBIT_CERT_FILE, RABBIT_KEY_FILE)
    except ConfigError as exc:
        print(f"svc.publish: {exc}", file=sys.stderr)
        return 2
    context = client_context(tls) if tls.is_set else None
    try:
        connection = pika.BlockingConnection(broker_parameters(args.url, context))
    except (pika.exceptions.AMQPConnectionError, ssl.SSLError) as exc:
        print(f"cannot reach RabbitMQ at the given --url: {exc!r}", file=sys.stderr)
        return 1
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(
        content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent
    )
    try:
        for _ in range(args.count):
            channel.basic_publish(args.exchange, args.routing_key, body, properties, mandatory=True)
    except pika.exceptions.UnroutableError:
        print(
            f"unroutable: no queue is bound to exchange {args.exchange!r} for routing key "
            f"{args.routing_key!r}; start a service first so that it declares its queue",
            file=sys.stderr,
        )
        return 1
    except pika.exceptions.NackError:
        print("the broker refused the message (not confirmed)", file=sys.stderr)
        return 1
    except pika.exceptions.ChannelClosedByBroker as exc:
        print(f"the broker closed the channel: {exc.reply_text}", file=sys.stderr)
        return 1
    finally:
        if connection.is_open:
            connection.close()
    print(f"published {args.count} x {body.decode(errors='replace')} to {args.exchange!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
