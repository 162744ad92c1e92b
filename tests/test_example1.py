"""End-to-end tests of ``python -m example1`` against the real RabbitMQ broker.

Each test runs example1 as a subprocess in a virtual host of its own, created with rabbitmqctl
and deleted afterwards, so the tests neither see nor leave messages in anyone else's queues.
Waits are bounded and read the subprocess's output as it comes; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pika
import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.rabbit

REPO = Path(__file__).resolve().parents[1]
BROKER = "127.0.0.1:5672"
# Fast enough that three events take well under a second, slow enough not to flood the output.
INTERVAL_SECONDS = 0.2
# Bounds, not expected durations: a healthy run needs a fraction of each.
EVENTS_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 20.0
RABBITMQCTL_TIMEOUT_SECONDS = 60.0
MIN_EVENTS = 3

LINE = re.compile(r"(?P<verb>published|received) (?P<type>\S+) id=(?P<id>\S+)"
                  r"(?: user_id=(?P<user_id>\d+))?")


def rabbitmqctl(*args: str) -> str:
    path = shutil.which("rabbitmqctl")
    if path is None:
        pytest.fail("rabbitmqctl not found on PATH; these tests create their own vhost with it. "
                    "Install RabbitMQ (`apt-get install rabbitmq-server`) or run them where the "
                    "broker's tools are on PATH.")
    result = subprocess.run([path, *args], check=False, capture_output=True, text=True,
                            timeout=RABBITMQCTL_TIMEOUT_SECONDS)
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture
def vhost(request: pytest.FixtureRequest) -> str:
    name = f"example1-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    request.addfinalizer(lambda: rabbitmqctl("delete_vhost", name))
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return name


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@{BROKER}/{vhost}"


class Example1:
    """A running ``python -m example1`` whose stdout lines a thread hands to the test."""

    def __init__(self, process: subprocess.Popen[str], stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._pending: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        assert process.stdout is not None
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._pending.put(line.rstrip("\n"))
        self._pending.put(None)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_until(self, condition: Callable[[list[str]], bool], what: str,
                   timeout: float = EVENTS_TIMEOUT_SECONDS) -> None:
        """Read output until ``condition(self.lines)`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {what} within {timeout:g}s; stdout so far:\n"
                            + "\n".join(self.lines) + f"\nstderr:\n{self.stderr()}")
            if self._eof:
                pytest.fail(f"example1 exited (status {self.process.wait()}) before {what}; "
                            f"stdout:\n" + "\n".join(self.lines) + f"\nstderr:\n{self.stderr()}")
            try:
                line = self._pending.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self._eof = True
            else:
                self.lines.append(line)

    def stop(self, signum: int) -> int:
        """Send ``signum``, wait for the exit and for the rest of stdout; return the status."""
        self.process.send_signal(signum)
        status = self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self.wait_until(lambda _: self._eof, "end of output", STOP_TIMEOUT_SECONDS)
        return status


@pytest.fixture
def start_example1(vhost: str, tmp_path: Path) -> Iterator[Callable[[], Example1]]:
    """Return a function that starts example1 on the test's vhost; it is killed if left running."""
    started: list[Example1] = []

    def start() -> Example1:
        stderr_path = tmp_path / f"example1-{len(started)}.stderr"
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "example1", "--interval", str(INTERVAL_SECONDS)],
                cwd=REPO, env={**os.environ, "RABBIT_URL": amqp_url(vhost)},
                stdout=subprocess.PIPE, stderr=stderr, text=True)
        started.append(Example1(process, stderr_path))
        return started[-1]

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(timeout=STOP_TIMEOUT_SECONDS)


def events(lines: list[str], verb: str) -> dict[str, tuple[str, str | None]]:
    """Return {event id: (type, user id)} for the ``published`` or ``received`` lines."""
    found = {}
    for line in lines:
        match = LINE.fullmatch(line)
        if match and match["verb"] == verb:
            found[match["id"]] = (match["type"], match["user_id"])
    return found


def received_at_least(count: int) -> Callable[[list[str]], bool]:
    return lambda lines: len(events(lines, "received")) >= count


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_receives_what_it_publishes_and_stops_cleanly_on_signal(
        start_example1: Callable[[], Example1], signum: int) -> None:
    example1 = start_example1()
    example1.wait_until(received_at_least(MIN_EVENTS), f"{MIN_EVENTS} received events")

    status = example1.stop(signum)

    published, received = events(example1.lines, "published"), events(example1.lines, "received")
    assert len(received) >= MIN_EVENTS
    # The vhost is new, so every event in my-queue must be one this run published.
    for event_id, (event_type, user_id) in received.items():
        assert event_type == "new_order"
        assert event_id in published, f"received {event_id}, which was never published"
        assert published[event_id] == (event_type, user_id), "the event changed on the way"
    assert status == 0, f"exit status {status}; stderr:\n{example1.stderr()}"
    assert example1.lines[-1] == "stopped"
    assert "Traceback" not in example1.stderr()


def test_declares_durable_topic_exchange_and_queue_bound_with_hash(
        start_example1: Callable[[], Example1], vhost: str) -> None:
    example1 = start_example1()
    example1.wait_until(received_at_least(1), "received event")
    assert example1.stop(signal.SIGINT) == 0

    exchanges = rabbitmqctl("list_exchanges", "-p", vhost, "-q", "--no-table-headers",
                            "name", "type", "durable")
    assert "events\ttopic\ttrue" in exchanges.splitlines()
    queues = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "durable")
    assert "my-queue\ttrue" in queues.splitlines()
    bindings = rabbitmqctl("list_bindings", "-p", vhost, "-q", "--no-table-headers",
                           "source_name", "destination_name", "routing_key")
    assert "events\tmy-queue\t#" in bindings.splitlines()


def test_reports_an_undecodable_body_and_keeps_going(
        start_example1: Callable[[], Example1], vhost: str) -> None:
    example1 = start_example1()
    # The first received event proves the queue exists and is bound.
    example1.wait_until(received_at_least(1), "received event")
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        connection.channel().basic_publish("events", "garbage", b"\xffnot json")
    example1.wait_until(lambda lines: any("undecodable" in line for line in lines),
                        "line about the undecodable body")
    seen = len(events(example1.lines, "received"))

    example1.wait_until(received_at_least(seen + 1), "event received after the bad one")

    assert example1.stop(signal.SIGINT) == 0
    assert "Traceback" not in example1.stderr()
    # Rejected without requeue: the bad body is not back in the queue (events published just
    # before the stop may be, since they were never acked).
    assert b"\xffnot json" not in drain(vhost, "my-queue")


def drain(vhost: str, queue_name: str) -> list[bytes]:
    """Take every message left in ``queue_name`` and return the bodies."""
    bodies: list[bytes] = []
    with pika.BlockingConnection(pika.URLParameters(amqp_url(vhost))) as connection:
        channel = connection.channel()
        while True:
            method, _, body = channel.basic_get(queue_name, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)


def test_help_prints_usage() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "example1", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--url" in done.stdout and "%2F" in done.stdout
