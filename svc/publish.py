"""``python -m svc.publish``: publish events to RabbitMQ, for people without plumber, and for load.

Every message is persistent (delivery mode 2) and published with the mandatory flag on a
channel in confirm mode, and the command accounts for each one: confirmed and routed to at
least one queue; returned as unroutable (no queue is bound for its routing key, so the broker
dropped it); nacked by the broker; or unconfirmed when the connection or channel was lost (it
may or may not have arrived). Anything but the first is reported at the end, with exit status
1: nothing is lost silently. Confirms are awaited in a window of ``--window`` messages in
flight, not one round trip per message.

Exit status: 0 when every message was confirmed and routed; 1 when one was not, a line of
``--file`` was skipped, or no broker answered; 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import ssl
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TextIO

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec

from svc.config import (
    DEFAULTS,
    RABBIT_CA_FILE,
    RABBIT_CERT_FILE,
    RABBIT_KEY_FILE,
    RABBIT_URL,
    merged_environment,
    parse_rabbit_urls,
    read_tls_files,
    redact_url,
)
from svc.errors import ConfigError
from svc.tls import broker_parameters, client_context, describe_connect_error

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

DEFAULT_EXCHANGE = "events"
SCRIPT = "svc-publish"  # the console script of pyproject.toml
DEFAULT_ROUTING_KEY = "foo"
DEFAULT_TYPE = "new_order"
# Note: a window of a few thousand keeps the broker's confirms flowing in `multiple` batches
# while bounding what a lost connection leaves unconfirmed; see the README's figures.
DEFAULT_WINDOW = 2000
# Below this many messages a progress line would only flicker.
PROGRESS_MIN_COUNT = 1000
PROGRESS_INTERVAL_SECONDS = 0.2
# Bad lines of --file and problem messages listed one by one before the rest are only counted.
MAX_LISTED = 10
# Seconds a connection blocked by a broker resource alarm may wait before we give up on it.
BLOCKED_TIMEOUT_SECONDS = 60.0
# AMQP reply code of a channel closed for a missing exchange.
NOT_FOUND = 404


@dataclass(frozen=True)
class Message:
    """One body to publish; ``label`` names it in reports (its event id, or its line)."""

    label: str
    body: bytes


@dataclass
class Labels:
    """How many messages had one fate, and the labels of the first few (memory stays bounded)."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, label: str) -> None:
        self.count += 1
        if len(self.first) < MAX_LISTED:
            self.first.append(label)

    def __bool__(self) -> bool:
        return self.count > 0

    def listed(self) -> str:
        more = f" and {self.count - len(self.first):,} more" if self.count > len(self.first) else ""
        return f" ({', '.join(self.first)}{more})"


@dataclass
class Tally:
    """What became of the messages of one run."""

    published: int = 0
    confirmed: int = 0
    unroutable: Labels = field(default_factory=Labels)
    nacked: Labels = field(default_factory=Labels)
    unconfirmed: Labels = field(default_factory=Labels)
    #: in flight when the broker closed the channel for a missing exchange: certainly lost
    refused: Labels = field(default_factory=Labels)
    error: str | None = None

    @property
    def is_clean(self) -> bool:
        return not (
            self.unroutable or self.nacked or self.unconfirmed or self.refused or self.error
        )


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None, environ: dict[str, str]) -> argparse.Namespace:
    default_url = environ.get(RABBIT_URL) or DEFAULTS[RABBIT_URL]
    parser = argparse.ArgumentParser(
        # Installed as a console script too: name the command the way it was typed.
        prog=SCRIPT if os.path.basename(sys.argv[0]) == SCRIPT else "python -m svc.publish",
        description="Publish events to RabbitMQ with publisher confirms and the mandatory flag.",
        epilog="Exit status: 0 every message confirmed and routed; 1 some message unroutable, "
        "nacked or unconfirmed, a bad --file line skipped, or no broker; 2 bad command line.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "event",
        nargs="?",
        default=None,
        help='the event as JSON, e.g. \'{"type":"new_order","id":"123"}\'; without an "id", '
        "each message gets a new one (default: a new_order with a new id)",
    )
    source.add_argument("--input", dest="input_event", metavar="JSON", help="same as EVENT")
    source.add_argument(
        "--file",
        "--input-file",
        metavar="PATH",
        help="publish each line of this JSON-lines file ('-' for stdin) as it is; a line that "
        "is not a JSON object is reported with its number and skipped (exit status 1)",
    )
    parser.add_argument(
        "--url",
        "--address",
        default=None,
        help="AMQP URL; several, comma-separated, are tried in turn (default: $RABBIT_URL from "
        "the environment or .env, else "
        + redact_url(DEFAULTS[RABBIT_URL]).replace("%", "%%")
        + ")",
    )
    parser.add_argument("--exchange", "--exchange-name", default=DEFAULT_EXCHANGE)
    parser.add_argument("--routing-key", default=DEFAULT_ROUTING_KEY)
    parser.add_argument("--count", type=int, default=1, help="messages to publish (default 1)")
    parser.add_argument(
        "--repeat-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="share of the messages, from 0 up to 1 (excluded), that reuse an id published "
        "earlier in the run: round(P x count) of them, exactly",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="make the ids and their order reproducible: the same seed gives the same ids, so "
        "a second run repeats the first one's (default: new ids on every run)",
    )
    parser.add_argument(
        "--id-prefix", help="generated ids are <prefix>-<n> (default: random, or from --seed)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help="messages published but not yet confirmed, at most (default %(default)s)",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="a progress line on stderr; auto: when stderr is a terminal and --count is at "
        f"least {PROGRESS_MIN_COUNT}",
    )
    args = parser.parse_args(argv)
    # Whether the URL came from the option, or from RABBIT_URL (maybe in .env) or the default.
    args.url_given = args.url is not None
    if args.url is None:
        args.url = default_url
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject combinations argparse cannot express; exits with status 2 naming the option."""
    if args.input_event is not None:
        args.event = args.input_event
    if args.count < 1:
        parser.error(f"--count must be a whole number of at least 1, not {args.count}")
    if not 0.0 <= args.repeat_rate < 1.0:
        parser.error(f"--repeat-rate must be at least 0 and below 1, not {args.repeat_rate:g}")
    if args.window < 1:
        parser.error(f"--window must be a whole number of at least 1, not {args.window}")
    if args.file is not None and (args.count != 1 or args.repeat_rate or args.seed is not None):
        parser.error(
            "--count, --repeat-rate and --seed make the ids; --file publishes its lines as "
            "they are: use one or the other"
        )
    if (
        args.repeat_rate
        and args.event is not None
        and fixed_id(decode_event(args.event)) is not None
    ):
        parser.error(
            '--repeat-rate needs generated ids, but the event fixes its "id": '
            "remove the id from the event"
        )
    if args.repeat_rate and args.event is not None and decode_event(args.event) is None:
        parser.error("--repeat-rate needs a JSON object as the event, to give it ids")
    try:
        args.urls = parse_rabbit_urls(args.url)
    except ValueError as exc:
        parser.error(f"--url {redact_url(args.url)!r} is invalid: expected {exc}")


# --- what to publish --------------------------------------------------------------------------


def decode_event(text: str) -> dict[str, Any] | None:
    """The event as a JSON object, or None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def fixed_id(event: dict[str, Any] | None) -> str | None:
    """The event's id as the service reads it (the key matches in any case), if it has one."""
    if event is None:
        return None
    for key, value in event.items():
        if key.lower() == "id":
            return str(value)
    return None


def id_prefix(args: argparse.Namespace) -> str:
    if args.id_prefix:
        return str(args.id_prefix)
    if args.seed is not None:
        return f"seed{args.seed}"
    # A fresh prefix per run, so the services see new ids unless told otherwise.
    return uuid.uuid4().hex[:12]


def generated_events(
    template: dict[str, Any], count: int, repeat_rate: float, rng: random.Random, prefix: str
) -> Iterator[Message]:
    """``count`` copies of ``template`` with ids; exactly round(rate x count) reuse one.

    The first message always has a new id. Which later ones repeat is chosen by selection
    sampling (exact count, constant memory), and a repeat reuses a uniformly chosen earlier id.
    """
    repeats_left = min(round(repeat_rate * count), count - 1)
    distinct = 0
    for position in range(count):
        candidates_left = count - position
        is_repeat = position > 0 and rng.random() * candidates_left < repeats_left
        if is_repeat:
            repeats_left -= 1
            number = rng.randrange(distinct)
        else:
            number = distinct
            distinct += 1
        event_id = f"{prefix}-{number}"
        yield Message(event_id, json.dumps({**template, "id": event_id}).encode())


def repeated_body(label: str, body: bytes, count: int) -> Iterator[Message]:
    for _ in range(count):
        yield Message(label, body)


class LineChecker:
    """Reads a JSON-lines stream; remembers how many lines were bad and says which."""

    def __init__(self, stream: IO[bytes], report: TextIO) -> None:
        self.stream = stream
        self.report = report
        self.bad = 0

    def messages(self) -> Iterator[Message]:
        for number, raw in enumerate(self.stream, 1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            problem, event = self.check(line)
            if problem:
                self.on_bad_line(number, problem)
                continue
            yield Message(fixed_id(event) or f"line {number}", line)

    @staticmethod
    def check(line: bytes) -> tuple[str | None, dict[str, Any] | None]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8", None
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"not valid JSON ({exc})", None
        if not isinstance(value, dict):
            return f"not a JSON object but {type(value).__name__}", None
        return None, value

    def on_bad_line(self, number: int, problem: str) -> None:
        self.bad += 1
        if self.bad <= MAX_LISTED:
            print(f"line {number}: {problem}; skipped", file=self.report)
        elif self.bad == MAX_LISTED + 1:
            print("more bad lines: counted at the end, not listed", file=self.report)


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """A one-line progress report on a terminal, rewritten in place with a carriage return."""

    def __init__(self, stream: TextIO, total: int | None, enabled: bool) -> None:
        self.stream = stream
        self.total = total
        self.enabled = enabled
        self.started = time.monotonic()
        self.last_shown = 0.0
        self.shown = False

    def update(self, tally: Tally, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last_shown < PROGRESS_INTERVAL_SECONDS):
            return
        self.last_shown = now
        rate = tally.published / max(now - self.started, 1e-9)
        of_total = ""
        if self.total:
            share = tally.published / self.total
            filled = int(share * 30)
            of_total = f"/{self.total:,} [{'#' * filled}{'.' * (30 - filled)}] {share:4.0%}"
        self.stream.write(
            f"\rpublished {tally.published:,}{of_total}  confirmed {tally.confirmed:,}  "
            f"{rate:,.0f} msg/s "
        )
        self.stream.flush()
        self.shown = True

    def finish(self, tally: Tally) -> None:
        if self.shown:
            self.update(tally, force=True)
            self.stream.write("\n")
            self.stream.flush()


# --- publishing -------------------------------------------------------------------------------


class ConfirmedPublisher:
    """Publishes ``messages`` on one connection, at most ``window`` unconfirmed at a time.

    Driven by pika's SelectConnection: :meth:`run` connects, and the callbacks below keep the
    window full until the messages run out and every confirm is in, or the connection or
    channel is lost (then whatever was in flight counts as unconfirmed and publishing stops).
    """

    def __init__(
        self,
        urls: Iterable[str],
        exchange: str,
        routing_key: str,
        messages: Iterator[Message],
        window: int,
        progress: Progress,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.urls = deque(urls)
        self.tls_context = tls_context
        self.exchange = exchange
        self.routing_key = routing_key
        self.messages = messages
        self.window = window
        self.progress = progress
        self.tally = Tally()
        self.connection: pika.SelectConnection | None = None
        self.channel: pika.channel.Channel | None = None
        self.next_tag = 1
        self.pending: dict[int, str] = {}
        self.pending_order: deque[int] = deque()
        self.returned: set[int] = set()
        self.current_url = ""
        self.connect_failures: list[str] = []  # each URL that failed, and why
        self.opened = False
        self.exhausted = False
        self.finishing = False

    def run(self) -> Tally:
        """Publish everything; return the tally once the connection is closed."""
        while self.urls and not self.opened:
            self.connect()
            assert self.connection is not None
            try:
                self.connection.ioloop.start()
            except KeyboardInterrupt:
                self.tally.error = "interrupted"
                self.abandon_pending()
                break
        self.progress.finish(self.tally)
        return self.tally

    def connect(self) -> None:
        url = self.urls.popleft()
        parameters = broker_parameters(url, self.tls_context)
        if parameters.blocked_connection_timeout is None:
            parameters.blocked_connection_timeout = BLOCKED_TIMEOUT_SECONDS
        log.debug("connecting to %s", redact_url(url))
        self.current_url = url
        self.connection = pika.SelectConnection(
            parameters,
            on_open_callback=self.on_connection_open,
            on_open_error_callback=self.on_connection_open_error,
            on_close_callback=self.on_connection_closed,
        )

    def on_connection_open_error(self, connection: Any, error: BaseException | str) -> None:
        """Called by pika when a connection attempt fails; :meth:`run` tries the next URL."""
        self.connect_failures.append(
            f"{redact_url(self.current_url)}: {describe_connect_error(error)}"
        )
        self.tally.error = "cannot connect to RabbitMQ at " + "; ".join(self.connect_failures)
        connection.ioloop.stop()

    def on_connection_open(self, connection: Any) -> None:
        self.opened = True
        self.tally.error = None
        connection.channel(on_open_callback=self.on_channel_open)

    def on_channel_open(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(self.on_returned)
        channel.confirm_delivery(ack_nack_callback=self.on_confirm, callback=self.on_confirm_mode)

    def on_confirm_mode(self, _frame: pika.frame.Method) -> None:
        """Called once the broker put the channel in confirm mode: start publishing."""
        self.publish_more()

    def publish_more(self) -> None:
        """Fill the window; once the messages ran out and all are confirmed, close."""
        assert self.channel is not None
        while not self.exhausted and len(self.pending) < self.window:
            message = next(self.messages, None)
            if message is None:
                self.exhausted = True
                break
            tag = self.next_tag
            self.next_tag += 1
            # The tag as message_id lets a basic.return, which carries no delivery tag, be
            # matched with the confirm that follows it.
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=str(tag),
            )
            self.channel.basic_publish(
                self.exchange, self.routing_key, message.body, properties, mandatory=True
            )
            self.pending[tag] = message.label
            self.pending_order.append(tag)
            self.tally.published += 1
        self.progress.update(self.tally)
        if self.exhausted and not self.pending:
            self.finish()

    def on_returned(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Return,
        properties: pika.BasicProperties,
        _body: bytes,
    ) -> None:
        """Called by pika for a basic.return: the broker routed the message to no queue.

        RabbitMQ sends the return before the message's confirm, so it is settled there.
        """
        log.debug("returned: %s %s", method.reply_code, method.reply_text)
        if properties.message_id and properties.message_id.isdigit():
            self.returned.add(int(properties.message_id))

    def on_confirm(self, frame: pika.frame.Method) -> None:
        """Called by pika for each basic.ack or basic.nack; settles the tags it covers."""
        method = frame.method
        is_ack = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            while self.pending_order and self.pending_order[0] <= method.delivery_tag:
                self.settle(self.pending_order.popleft(), is_ack)
        else:
            self.settle(method.delivery_tag, is_ack)
            # Drop tags settled one by one from the front, so the queue of tags stays short.
            while self.pending_order and self.pending_order[0] not in self.pending:
                self.pending_order.popleft()
        self.publish_more()

    def settle(self, tag: int, is_ack: bool) -> None:
        label = self.pending.pop(tag, None)
        if label is None:
            return  # settled before, by a single confirm
        if not is_ack:
            self.tally.nacked.add(label)
        elif tag in self.returned:
            self.returned.discard(tag)
            self.tally.unroutable.add(label)
        else:
            self.tally.confirmed += 1

    def finish(self) -> None:
        if self.finishing:
            return
        self.finishing = True
        assert self.connection is not None
        if self.connection.is_open:
            self.connection.close()

    def on_channel_closed(self, _channel: pika.channel.Channel, reason: BaseException) -> None:
        """Called by pika when the channel closes; unexpected unless we are finishing."""
        if not self.finishing:
            # pika also closes the channel, first, when the connection is lost.
            if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
                self.tally.error = f"the broker closed the channel: {describe_close(reason)}"
            else:
                self.tally.error = f"the connection was lost: {describe_close(reason)}"
            if getattr(reason, "reply_code", None) == NOT_FOUND:
                self.tally.error += (
                    "; start a service first so that it declares the exchange"
                    if self.exchange == DEFAULT_EXCHANGE
                    else f"; the services declare only {DEFAULT_EXCHANGE!r}: check --exchange"
                )
                # Published to an exchange that does not exist: none of them can have arrived.
                self.abandon_pending(self.tally.refused)
            else:
                self.abandon_pending()
            self.finish()

    def on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        """Called by pika when the connection closes: the run is over either way."""
        if not self.finishing:
            self.tally.error = f"the connection was lost: {describe_close(reason)}"
            self.abandon_pending()
        connection.ioloop.stop()

    def abandon_pending(self, fate: Labels | None = None) -> None:
        """Count what is still in flight as ``fate`` (unconfirmed), and publish nothing more."""
        fate = self.tally.unconfirmed if fate is None else fate
        for label in self.pending.values():
            fate.add(label)
        self.pending.clear()
        self.pending_order.clear()
        self.exhausted = True


def describe_close(reason: BaseException) -> str:
    if isinstance(reason, pika.exceptions.ChannelClosed | pika.exceptions.ConnectionClosed):
        return f"{reason.reply_code} {reason.reply_text}"
    return repr(reason)


# --- report -----------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, tally: Tally, bad_lines: int, seconds: float, out: TextIO, err: TextIO
) -> int:
    """Print the outcome; return the exit status."""
    rate = tally.published / seconds if seconds > 0 else 0.0
    if tally.published == 0 and tally.error:
        print(tally.error, file=err)  # nothing went out: the reason is the whole story
        return EXIT_PROBLEM
    print(
        f"published {tally.published:,} message(s) to exchange {args.exchange!r} with routing "
        f"key {args.routing_key!r} in {seconds:.2f} s ({rate:,.0f} msg/s): "
        f"{tally.confirmed:,} confirmed and routed",
        file=out,
    )
    if tally.unroutable:
        print(
            f"{tally.unroutable.count:,} unroutable, dropped by the broker: no queue is bound to "
            f"exchange {args.exchange!r} for routing key {args.routing_key!r}; start a service "
            f"first so that it declares its queue{tally.unroutable.listed()}",
            file=err,
        )
    if tally.nacked:
        print(
            f"{tally.nacked.count:,} not confirmed: the broker nacked them{tally.nacked.listed()}",
            file=err,
        )
    if tally.refused:
        print(
            f"{tally.refused.count:,} not delivered: the broker refused them (see below)"
            f"{tally.refused.listed()}",
            file=err,
        )
    if tally.unconfirmed:
        print(
            f"{tally.unconfirmed.count:,} unconfirmed when publishing stopped: they may or may "
            f"not have arrived{tally.unconfirmed.listed()}",
            file=err,
        )
    if tally.error:
        print(tally.error, file=err)
    if bad_lines:
        print(f"{bad_lines:,} bad line(s) of {args.file} skipped", file=err)
    return EXIT_OK if tally.is_clean and not bad_lines else EXIT_PROBLEM


def main(argv: list[str] | None = None) -> int:
    env = merged_environment(os.environ, ".env")
    args = parse_args(argv, env)
    try:
        # The service's TLS settings, so an amqps:// --url verifies the broker the same way.
        tls = read_tls_files(env, RABBIT_CA_FILE, RABBIT_CERT_FILE, RABBIT_KEY_FILE)
    except ConfigError as exc:
        print(f"svc.publish: {exc}", file=sys.stderr)
        return EXIT_USAGE
    checker: LineChecker | None = None
    total: int | None = args.count
    if args.file is not None:
        try:
            stream = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
        except OSError as exc:
            print(f"cannot read --file {args.file!r}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        checker = LineChecker(stream, sys.stderr)
        messages: Iterator[Message] = checker.messages()
        total = None
    else:
        messages = messages_for(args)
    is_tty = sys.stderr.isatty()
    show = args.progress == "always" or (
        args.progress == "auto" and is_tty and (total or 0) >= PROGRESS_MIN_COUNT
    )
    started = time.monotonic()
    publisher = ConfirmedPublisher(
        args.urls,
        args.exchange,
        args.routing_key,
        messages,
        args.window,
        Progress(sys.stderr, total, show),
        client_context(tls) if tls.is_set else None,
    )
    try:
        tally = publisher.run()
    finally:
        if checker is not None and checker.stream is not sys.stdin.buffer:
            checker.stream.close()
    if tally.published == 0 and tally.error and not args.url_given and RABBIT_URL in env.from_file:
        # docker-compose's broker account, in .env, is not a local broker's guest/guest.
        tally.error += f" (RABBIT_URL from {env.path}: edit or remove it for another broker)"
    seconds = time.monotonic() - started
    return report(args, tally, checker.bad if checker else 0, seconds, sys.stdout, sys.stderr)


def messages_for(args: argparse.Namespace) -> Iterator[Message]:
    """The messages of an EVENT (or the default one) and --count/--repeat-rate/--seed."""
    text = args.event if args.event is not None else json.dumps({"type": DEFAULT_TYPE})
    event = decode_event(text)
    if event is None:
        # Sent anyway: a malformed body is a fair test of the dead-letter queue.
        print("note: the event is not a JSON object; publishing it as it is", file=sys.stderr)
        return repeated_body("the event", text.encode(), args.count)
    if fixed_id(event) is not None:
        return repeated_body(str(fixed_id(event)), text.encode(), args.count)
    rng = random.Random(args.seed)
    return generated_events(event, args.count, args.repeat_rate, rng, id_prefix(args))


if __name__ == "__main__":
    sys.exit(main())
