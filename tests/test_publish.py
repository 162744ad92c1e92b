"""``python -m svc.publish``: what a user sees and what arrives in the broker.

The command runs as a subprocess in an empty working directory (no stray ``.env``) against
this test's own vhost; what it published is read back from a queue with ``basic_get``, and the
service's counts from statsd packets.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from svc.publish import generated_events
from tests.support import (
    EXCHANGE,
    Publisher,
    ServiceProcess,
    StatsdListener,
    TcpProxy,
    base_environment,
    free_port,
    queue_depth,
    unique_name,
    wait_queue_empty,
    wait_until,
)

PUBLISH_TIMEOUT_SECONDS = 120


def run_publish(
    *args: str, cwd: Path, url: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    url_args = ["--url", url] if url is not None else []
    return subprocess.run(
        [sys.executable, "-m", "svc.publish", *url_args, *args],
        env=base_environment(),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PUBLISH_TIMEOUT_SECONDS,
        check=False,
    )


def bind_queue(
    url: str, queue: str, binding_key: str = "#", arguments: dict[str, Any] | None = None
) -> None:
    """A durable queue bound to ``events`` as a service binds its own."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        channel.queue_declare(queue, durable=True, arguments=arguments)
        channel.queue_bind(queue, EXCHANGE, binding_key)
    finally:
        connection.close()


def drain(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message in ``queue`` (acked as read), in order."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    messages = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((properties, body))
    finally:
        connection.close()


def ids_of(messages: list[tuple[Any, bytes]]) -> list[str]:
    return [json.loads(body)["id"] for _, body in messages]


# --- ids, without a broker ---------------------------------------------------------------------


@pytest.mark.parametrize(("count", "rate"), [(1, 0.0), (10, 0.3), (1000, 0.3), (7, 0.99), (500, 0)])
def test_repeat_rate_reuses_exactly_that_share_of_earlier_ids(count: int, rate: float) -> None:
    ids = [m.label for m in generated_events({"type": "t"}, count, rate, random.Random(5), "p")]
    assert len(ids) == count
    assert len(set(ids)) == count - min(round(rate * count), count - 1)
    # A repeat reuses an id published before it, never one from later.
    seen: set[str] = set()
    for event_id in ids:
        if event_id not in seen:
            assert event_id == f"p-{len(seen)}"
            seen.add(event_id)


def test_same_seed_gives_the_same_ids_and_bodies_keep_the_event() -> None:
    def run(seed: int) -> list[bytes]:
        return [
            m.body
            for m in generated_events({"type": "x", "a": 1}, 50, 0.4, random.Random(seed), "s")
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert json.loads(run(3)[0]) == {"type": "x", "a": 1, "id": "s-0"}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--count", "0"], "--count"),
        (["--repeat-rate", "1"], "--repeat-rate"),
        (["--window", "0"], "--window"),
        (["--file", "x.jsonl", "--count", "3"], "--file"),
        (["--file", "missing.jsonl"], "cannot read --file"),
        (['{"type":"new_order","id":"7"}', "--repeat-rate", "0.5"], '"id"'),
        (["--url", "http://localhost"], "--url"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path: Path, args: list[str], named: str) -> None:
    done = run_publish(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ([str(Path(sys.executable).with_name("svc-publish"))], "usage: svc-publish "),
        ([sys.executable, "-m", "svc.publish"], "usage: python -m svc.publish "),
    ],
)
def test_help_names_the_command_as_it_was_typed(command: list[str], usage: str) -> None:
    done = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:200]


def test_no_broker_exits_1_and_says_so(tmp_path: Path) -> None:
    done = run_publish(cwd=tmp_path, url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    assert done.returncode == 1
    assert "cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1" in done.stderr
    assert ".env" not in done.stderr  # the URL came from --url


def test_no_broker_at_the_dotenv_url_points_at_the_file(tmp_path: Path) -> None:
    """docker-compose's .env holds its own broker account: a newcomer must learn where the
    URL that failed came from."""
    (tmp_path / ".env").write_text(f"RABBIT_URL=amqp://demo:s3cret@127.0.0.1:{free_port()}/\n")
    done = run_publish(cwd=tmp_path)
    assert done.returncode == 1
    assert "cannot connect to RabbitMQ at amqp://demo:***@127.0.0.1" in done.stderr
    assert "(RABBIT_URL from .env: edit or remove it" in done.stderr
    assert "s3cret" not in done.stderr

    # The same URL given with --url: the file is not to blame.
    url = (tmp_path / ".env").read_text().strip().partition("=")[2]
    done = run_publish(cwd=tmp_path, url=url)
    assert done.returncode == 1
    assert "cannot connect to RabbitMQ" in done.stderr and ".env" not in done.stderr


def test_every_url_that_failed_is_named(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    urls = f"amqp://guest:guest@127.0.0.1:{first}/,amqp://guest:guest@127.0.0.1:{second}/"
    done = run_publish(cwd=tmp_path, url=urls)
    assert done.returncode == 1
    assert f"127.0.0.1:{first}/: [Errno 111] Connection refused; " in done.stderr
    assert f"127.0.0.1:{second}/: [Errno 111] Connection refused" in done.stderr


# --- against the broker ------------------------------------------------------------------------


@pytest.mark.rabbit
def test_unroutable_messages_are_counted_and_exit_1(tmp_path: Path, vhost: str) -> None:
    bind_queue(vhost, "only-bar", binding_key="bar")  # the exchange exists; nothing gets "foo"

    done = run_publish("--count", "3", cwd=tmp_path, url=vhost)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "0 confirmed and routed" in done.stdout
    assert "3 unroutable, dropped by the broker: no queue is bound to exchange 'events'" in (
        done.stderr
    )
    assert drain(vhost, "only-bar") == []


def number_before(text: str, words: str) -> int:
    match = re.search(r"([\d,]+) " + re.escape(words), text)
    assert match, f"no count before {words!r} in {text!r}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.rabbit
def test_nacked_messages_are_counted_and_exit_1(tmp_path: Path, vhost: str) -> None:
    # A full queue that rejects publishes makes the broker nack what it cannot take.
    bind_queue(vhost, "full", arguments={"x-max-length": 5, "x-overflow": "reject-publish"})

    done = run_publish("--count", "12", "--window", "1", cwd=tmp_path, url=vhost)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "5 confirmed and routed" in done.stdout
    assert "7 not confirmed: the broker nacked them" in done.stderr
    assert len(drain(vhost, "full")) == 5


@pytest.mark.rabbit
def test_lost_connection_leaves_no_message_unaccounted(tmp_path: Path, vhost: str) -> None:
    bind_queue(vhost, "cut")
    proxy = TcpProxy().start()
    cut_done = threading.Event()

    def cut_once_messages_arrive() -> None:
        try:
            wait_until(lambda: queue_depth(vhost, "cut")[0] >= 2000, 60, "2000 messages")
            proxy.cut()
        finally:
            cut_done.set()

    cutter = threading.Thread(target=cut_once_messages_arrive, daemon=True)
    cutter.start()
    try:
        done = run_publish("--count", "200000", cwd=tmp_path, url=proxy.url(vhost))
    finally:
        cut_done.wait(timeout=90)
        proxy.stop()

    assert done.returncode == 1, done.stdout + done.stderr
    assert "the connection was lost" in done.stderr
    published = number_before(done.stdout, "message(s)")
    confirmed = number_before(done.stdout, "confirmed and routed")
    unconfirmed = number_before(done.stderr, "unconfirmed")
    assert published < 200000 and unconfirmed > 0
    assert confirmed + unconfirmed == published
    # Every confirmed message is in the queue; an unconfirmed one may or may not be.
    arrived = queue_depth(vhost, "cut")[0]
    assert confirmed <= arrived <= published


@pytest.mark.rabbit
def test_missing_exchange_is_reported_and_exit_1(tmp_path: Path, vhost: str) -> None:
    done = run_publish(cwd=tmp_path, url=vhost)

    assert done.returncode == 1
    assert "no exchange 'events'" in done.stderr
    assert "start a service first" in done.stderr


@pytest.mark.rabbit
def test_mistyped_exchange_is_named_as_the_thing_to_check(tmp_path: Path, vhost: str) -> None:
    """No service declares another exchange than ``events``: starting one would not help."""
    done = run_publish("--exchange", "evnets", cwd=tmp_path, url=vhost)

    assert done.returncode == 1
    assert "no exchange 'evnets'" in done.stderr
    assert "check --exchange" in done.stderr and "start a service" not in done.stderr


@pytest.mark.rabbit
def test_repeat_rate_gives_the_distinct_ids_a_consumer_sees(tmp_path: Path, vhost: str) -> None:
    bind_queue(vhost, "seen")

    done = run_publish(
        '{"type":"new_order","note":"x"}',
        "--count",
        "400",
        "--repeat-rate",
        "0.25",
        "--window",
        "64",
        "--progress",
        "always",
        cwd=tmp_path,
        url=vhost,
    )

    assert done.returncode == 0, done.stderr
    assert "400 message(s)" in done.stdout and "400 confirmed and routed" in done.stdout
    assert "published 400/400" in done.stderr  # the progress line's last state
    messages = drain(vhost, "seen")
    assert len(messages) == 400
    assert len(set(ids_of(messages))) == 300
    assert {json.loads(body)["note"] for _, body in messages} == {"x"}
    assert {props.delivery_mode for props, _ in messages} == {2}
    assert {props.content_type for props, _ in messages} == {"application/json"}


@pytest.mark.rabbit
def test_file_publishes_good_lines_as_they_are_and_reports_bad_ones(
    tmp_path: Path, vhost: str
) -> None:
    bind_queue(vhost, "lines")
    lines = [
        '{"type":"new_order","id":"a"}',
        '{"type":"new_order","id":',  # line 2: cut short
        "",
        '["not", "an", "object"]',  # line 4
        '{"Type": "ban_user", "ID": 42}',
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")

    done = run_publish("--file", str(path), cwd=tmp_path, url=vhost)

    assert done.returncode == 1, done.stderr
    assert "line 2: not valid JSON" in done.stderr
    assert "line 4: not a JSON object" in done.stderr
    assert "2 bad line(s)" in done.stderr
    assert "2 confirmed and routed" in done.stdout
    assert [body.decode() for _, body in drain(vhost, "lines")] == [lines[0], lines[4]]


@pytest.mark.rabbit
def test_file_from_stdin_and_url_from_dotenv(tmp_path: Path, vhost: str) -> None:
    bind_queue(vhost, "stdin")
    (tmp_path / ".env").write_text(f"RABBIT_URL={vhost}\n")
    events = "".join(json.dumps({"type": "new_order", "id": str(n)}) + "\n" for n in range(5))

    done = run_publish("--input-file", "-", "--exchange-name", "events", cwd=tmp_path, stdin=events)

    assert done.returncode == 0, done.stderr
    assert ids_of(drain(vhost, "stdin")) == ["0", "1", "2", "3", "4"]


@pytest.mark.rabbit
@pytest.mark.etcd
def test_service_counts_ok_and_skipped_as_published(
    tmp_path: Path,
    vhost: str,
    publisher: Publisher,
    run_dedup_service: Callable[..., ServiceProcess],
    statsd_listener: StatsdListener,
) -> None:
    orders = unique_name("orders")
    publisher.declare_topology(orders)
    service = run_dedup_service(orders, LOG_EVENTS="false")

    done = run_publish("--count", "200", "--repeat-rate", "0.3", cwd=tmp_path, url=vhost)

    assert done.returncode == 0, done.stderr
    assert statsd_listener.wait_for(f"{orders}_new_order_ok", 140) == 140
    assert statsd_listener.wait_for(f"{orders}_new_order_skipped", 60) == 60
    wait_queue_empty(vhost, f"{orders}-queue", timeout=30)
    assert statsd_listener.total(f"{orders}_new_order_ok") == 140
    assert service.is_running()
