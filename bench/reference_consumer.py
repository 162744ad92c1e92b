"""The bare pika consumer that ``bench/throughput.py`` measures ``python -m svc`` against.

It does the least a consumer of the demo's events can do and still count them: a
``BlockingConnection``, ``basic_consume`` on an existing queue and, for each delivery, a JSON
decode, one lookup and insert of the id in a set (the in-memory part of de-duplication, without
etcd), and one statsd UDP packet (``<name>_new_order_ok`` or ``_skipped``), as the Go demo sends
one per event. The ack strategy is the ``--ack`` mode:

* ``each``: ``basic_ack`` of every delivery as soon as it is counted;
* ``multiple``: one ``basic_ack(multiple=True)`` every ``--ack-every`` deliveries (default 100)
  and one for the rest at the end: the mode the benchmark's ratios are taken against;
* ``none``: ``auto_ack=True``; the broker forgets a message as it sends it, so nothing is
  redelivered after a crash: an upper bound, not a safe consumer.

It stops after ``--count`` deliveries and prints one JSON line on stdout: its elapsed time
from the first delivery to the last (after the final ack), its own CPU seconds
(``resource.getrusage``, start-up and imports included), its peak RSS (VmHWM from /proc: the
``ru_maxrss`` of a forked child also counts its parent's memory), and its counts.

    python bench/reference_consumer.py --url amqp://guest:guest@127.0.0.1:5672/%2F \\
        --queue ref-queue --count 150000 --ack multiple --statsd-port 8125
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import pika
import statsd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/reference_consumer.py",
        description="Bare pika consumer used as the benchmark's reference.",
    )
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--queue", required=True, help="an existing queue holding the events")
    parser.add_argument("--count", type=int, required=True, help="stop after this many")
    parser.add_argument("--ack", choices=("each", "multiple", "none"), default="multiple")
    parser.add_argument("--ack-every", type=int, default=100, help="for --ack multiple")
    parser.add_argument(
        "--prefetch", type=int, default=100, help="basic.qos prefetch (ignored by --ack none)"
    )
    parser.add_argument("--name", default="ref", help="metric prefix: <name>_new_order_ok")
    parser.add_argument("--statsd-host", default="127.0.0.1")
    parser.add_argument("--statsd-port", type=int, default=8125)
    args = parser.parse_args(argv)
    if args.count < 1 or args.ack_every < 1 or args.prefetch < 1:
        parser.error("--count, --ack-every and --prefetch must be positive")
    if args.ack == "multiple" and args.prefetch < args.ack_every:
        # The broker would stop sending before the ack is due: the consumer would stall.
        parser.error("--prefetch must be at least --ack-every with --ack multiple")
    return args


class Reference:
    """Counts deliveries and stops the connection's consume loop after the last one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.seen: set[str] = set()
        self.received = 0
        self.ok = 0
        self.skipped = 0
        self.invalid = 0
        self.first: float | None = None
        self.last: float | None = None
        self.unacked_tag = 0
        self.since_ack = 0
        # The same statsd client as svc; each incr() is one UDP packet.
        self.statsd = statsd.StatsClient(args.statsd_host, args.statsd_port)
        self.ok_metric = f"{args.name}_new_order_ok"
        self.skipped_metric = f"{args.name}_new_order_skipped"
        self.invalid_metric = f"{args.name}_invalid"

    def on_message(self, channel, method, _properties, body: bytes) -> None:  # type: ignore[no-untyped-def]
        if self.first is None:
            self.first = time.monotonic()
        self.received += 1
        try:
            event_id = str(json.loads(body)["id"])
        except (ValueError, KeyError, TypeError):
            metric = self.invalid_metric
            self.invalid += 1
        else:
            if event_id in self.seen:
                metric = self.skipped_metric
                self.skipped += 1
            else:
                self.seen.add(event_id)
                metric = self.ok_metric
                self.ok += 1
        self.statsd.incr(metric)
        ack = self.args.ack
        if ack == "each":
            channel.basic_ack(method.delivery_tag)
        elif ack == "multiple":
            self.unacked_tag = method.delivery_tag
            self.since_ack += 1
            if self.since_ack >= self.args.ack_every:
                channel.basic_ack(self.unacked_tag, multiple=True)
                self.since_ack = 0
        if self.received >= self.args.count:
            if ack == "multiple" and self.since_ack:
                channel.basic_ack(self.unacked_tag, multiple=True)
                self.since_ack = 0
            self.last = time.monotonic()
            channel.stop_consuming()


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM), in KiB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ref = Reference(args)
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    auto_ack = args.ack == "none"
    if not auto_ack:
        channel.basic_qos(prefetch_count=args.prefetch)
    channel.basic_consume(args.queue, ref.on_message, auto_ack=auto_ack)
    channel.start_consuming()
    # Deliveries past --count (possible with auto_ack) are gone; with manual acks they return.
    connection.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    assert ref.first is not None and ref.last is not None
    elapsed = ref.last - ref.first
    print(
        json.dumps(
            {
                "ack": args.ack,
                "count": ref.received,
                "ok": ref.ok,
                "skipped": ref.skipped,
                "invalid": ref.invalid,
                "elapsed_s": round(elapsed, 6),
                "events_per_s": round(ref.received / elapsed, 1) if elapsed > 0 else None,
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                "peak_rss_mb": round(peak_rss_kib() / 1024, 1),
                # Linux reports ru_maxrss in KiB. It is no measure of this program: it keeps
                # the high-water mark of the parent's address space this process was forked
                # from (kept across execve), so it grows with the benchmark's own memory.
                "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
