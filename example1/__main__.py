"""Command line and main loop of ``python -m example1``.

One thread does everything: ``BlockingConnection.process_data_events`` delivers messages to the
consumer and runs the publish timer set with ``call_later``, and between two calls the loop checks
whether SIGINT or SIGTERM asked it to stop. Stopping cancels the consumer (unacked deliveries go
back to the queue), closes the connection and exits 0 after printing "stopped". A broker error,
including a lost connection, ends the run with status 1: example1 does not reconnect.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import urllib.parse
from typing import TYPE_CHECKING

import pika
import pika.exceptions

from example1 import consumer, producer, topology

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

log = logging.getLogger(__name__)

URL_VAR = "RABBIT_URL"
DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_INTERVAL_SECONDS = 5.0
# How long one process_data_events call may block: the worst-case delay between a signal and
# the start of the shutdown, since the signal handler only sets a flag.
POLL_SECONDS = 0.2
# A few deliveries in hand at a time is plenty for a demo that prints them.
PREFETCH_COUNT = 10


class StopFlag:
    """Set by the signal handler, read by the main loop.

    The handler must not touch the connection itself: it runs between two bytecodes of whatever
    the main thread is doing, possibly in the middle of pika's own frame handling.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Record the first stop request; the main loop sees it within POLL_SECONDS."""
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def is_set(self) -> bool:
        """True once SIGINT or SIGTERM arrived."""
        return self.signal_name is not None


def positive_seconds(text: str) -> float:
    """Parse ``--interval``; argparse turns the ValueError into a usage error."""
    seconds = float(text)
    if not (seconds > 0 and math.isfinite(seconds)):  # "nan" fails the first test
        raise ValueError(text)
    return seconds


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Read the command line; ``--url`` falls back to $RABBIT_URL, then to the local broker."""
    parser = argparse.ArgumentParser(
        prog="python -m example1",
        description="Publish a new_order event every few seconds to the 'events' exchange and "
                    "print every event delivered to 'my-queue'. Stop with Ctrl-C.")
    parser.add_argument(
        "--url", default=os.environ.get(URL_VAR, DEFAULT_URL),
        # argparse formats help with %, and the default URL holds one (%2F).
        help=f"AMQP URL of the broker (default: ${URL_VAR}, else {DEFAULT_URL})".replace("%", "%%"))
    parser.add_argument(
        "--interval", metavar="SECONDS", type=positive_seconds,
        default=DEFAULT_INTERVAL_SECONDS,
        help=f"seconds between two published events (default: {DEFAULT_INTERVAL_SECONDS:g})")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pika's own log lines")
    return parser.parse_args(argv)


def redact(url: str) -> str:
    """Return ``url`` with its password replaced, for log lines."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


def run(url: str, interval_seconds: float, stop: StopFlag) -> None:
    """Publish and consume until ``stop`` is set; pika's errors propagate to the caller."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        topology.declare(channel)
        # Confirms make "published" mean "the broker has it"; see producer.publish.
        channel.confirm_delivery()
        channel.basic_qos(prefetch_count=PREFETCH_COUNT)
        consumer_tag = channel.basic_consume(topology.QUEUE, consumer.on_message)
        log.info("connected to %s, publishing every %gs; Ctrl-C to stop", redact(url),
                 interval_seconds)

        def on_timer() -> None:
            """Called by process_data_events every interval: publish, then re-arm."""
            producer.publish(channel, producer.make_new_order())
            connection.call_later(interval_seconds, on_timer)

        on_timer()
        while not stop.is_set():
            connection.process_data_events(time_limit=POLL_SECONDS)

        log.info("%s received, stopping", stop.signal_name)
        # Cancelling first means nothing new is delivered while the connection closes; pika
        # nacks, with requeue, the deliveries it had buffered but not yet handed to on_message.
        channel.basic_cancel(consumer_tag)
    finally:
        if connection.is_open:
            connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run example1 and return its exit status: 0 after a signal, 1 on a broker error."""
    # Handlers go in before anything slow, so an early Ctrl-C is a clean stop, not a traceback.
    stop = StopFlag()
    signal.signal(signal.SIGINT, stop.on_signal)
    signal.signal(signal.SIGTERM, stop.on_signal)

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pika logs every connection step at INFO and a failed connect as an ERROR with a traceback;
    # every failure that matters reaches main() as an exception and is logged once, below.
    logging.getLogger("pika").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        run(args.url, args.interval, stop)
    except pika.exceptions.AMQPConnectionError as exc:
        # Covers both a failed connect and a connection lost later: example1 does not reconnect.
        log.error("connection to the broker at %s failed: %r", redact(args.url), exc)
        return 1
    except pika.exceptions.AMQPError as exc:
        log.error("broker error: %r", exc)
        return 1
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
