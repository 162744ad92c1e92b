"""The broker goes away, comes back, refuses us: the daemon rides it out or says why it cannot.

RabbitMQ is never stopped here (other work shares it). "The broker is down" is a TCP proxy of
the test's own that stops listening; "the connection is cut" is the proxy dropping every
connection, or the broker closing the service's connection (``rabbitmqctl close_connection``).
Which events were handled comes from the lossless TEST_HANDLED_LOG journal; how often a handler
really ran comes from the calls file of the test handler ``slow_order``, which is appended to
before the handler returns, so a run whose outcome was lost in the cut still shows there.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

from tests.handlers_for_tests import read_calls
from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    TcpProxy,
    close_vhost_connections,
    count_lines,
    free_port,
    read_handled,
    unique_name,
    vhost_connections,
    wait_queue_empty,
    wait_until,
)

pytestmark = [pytest.mark.rabbit]

RECONNECT_LINE = "broker connection lost"
NO_BROKER_LINE = "cannot connect to RabbitMQ"
DELAY = re.compile(r"cannot connect to RabbitMQ \(.*\); reconnecting in ([0-9.]+) s")
STALE_TAG = "unknown delivery tag"
HANDLER_SECONDS = 0.002


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A TCP proxy to 127.0.0.1:5672 on a free port; not listening until the test starts it."""
    tcp = TcpProxy()
    yield tcp
    tcp.stop()


def publish_counted(publisher: Publisher, ids: list[str], calls_file: Path) -> None:
    """Publish ``slow_order`` events that note each handler call in a file.

    Each call sleeps HANDLER_SECONDS, so the daemon handles at most a few hundred events a
    second and a cut made through rabbitmqctl (which takes a second or two) lands mid-stream.
    """
    for event_id in ids:
        publisher.publish(
            {
                "type": "slow_order",
                "id": event_id,
                "args": {"seconds": HANDLER_SECONDS, "calls_file": str(calls_file)},
            }
        )


def assert_no_stale_tag_acks(svc: ServiceProcess) -> None:
    stale = [line for line in svc.snapshot() if STALE_TAG in line or "PRECONDITION_FAILED" in line]
    assert not stale, f"acked a tag of an old channel on a new one: {stale[:3]}"


def test_started_before_the_broker_is_reachable_retries_with_growing_delays_then_consumes(
    run_service: Callable[..., ServiceProcess],
    proxy: TcpProxy,
    vhost: str,
    tmp_path: Path,
) -> None:
    """Failure: nothing listens at RABBIT_URL when the daemon starts (broker still booting).

    Recovery expected: the daemon does not exit; it logs every failed attempt with a delay that
    grows, and once the broker answers it declares its queue and consumes on its own.
    """
    orders = unique_name("orders")
    handled_log = tmp_path / "handled"
    svc = run_service(
        orders,
        wait_ready=False,
        RABBIT_URL=proxy.url(vhost),
        TEST_HANDLED_LOG=str(handled_log),
    )
    svc.wait_for_line(NO_BROKER_LINE, timeout=30, count=4)
    delays = [float(m[1]) for m in svc.matches(DELAY)]
    assert len(delays) == svc.count(NO_BROKER_LINE), "a failed attempt was logged without delay"
    assert delays[3] > delays[0], f"the delay does not grow: {delays}"
    assert svc.count("connecting to RabbitMQ") >= 4, "not every attempt was logged"
    # Each line says where it tried and why that failed, the password left out.
    attempt = next(m[0] for m in svc.matches(DELAY))
    assert f"@127.0.0.1:{proxy.port}/" in attempt and "Connection refused" in attempt, attempt
    assert ":***@" in attempt and ":guest@" not in attempt, attempt
    assert svc.is_running()

    proxy.start()
    svc.wait_ready(timeout=30)
    publisher = Publisher(vhost)
    try:
        publisher.publish({"type": "new_order", "id": "late-broker-1"})
    finally:
        publisher.close()
    wait_until(lambda: read_handled(handled_log) == ["late-broker-1"], 30, "the event handled")
    assert svc.is_running(), f"exited with {svc.returncode()}:\n{svc.tail()}"
    assert svc.terminate() == 0


@pytest.mark.etcd
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cut_by", ["proxy", "broker"])
def test_connection_cut_while_events_flow_loses_nothing_and_handles_nothing_twice(
    cut_by: str,
    run_dedup_service: Callable[..., ServiceProcess],
    proxy: TcpProxy,
    statsd_listener: StatsdListener,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """Failure: the AMQP connection dies with a prefetch window of deliveries unacked.

    ``proxy``: the network drops the connection; ``broker``: RabbitMQ closes it
    (``rabbitmqctl close_connection``). Recovery expected: the daemon reconnects and carries
    on; the broker requeues what the dead channel held; no tag of the dead channel is acked on
    the new one; every event is handled, and, with de-duplication on, none twice: an id is
    recorded before its ack, so a redelivered copy is skipped, and a batch cut off before its
    record is either not yet handled or still recorded by this process.
    """
    orders = unique_name("orders")
    handled_log, calls_file = tmp_path / "handled", tmp_path / "calls"
    ids = [f"cut-{n:05d}" for n in range(4000)]
    publisher = Publisher(vhost)
    try:
        publisher.declare_topology(orders)
        publish_counted(publisher, ids, calls_file)
    finally:
        # Closed before the cut, so the only connection left in the vhost is the daemon's.
        publisher.close()
    proxy.start()
    svc = run_dedup_service(
        orders,
        RABBIT_URL=proxy.url(vhost),
        TEST_HANDLED_LOG=str(handled_log),
        HANDLER_MODULES="tests.handlers_for_tests",
        PREFETCH="50",
        LOG_EVENTS="false",
    )
    wait_until(lambda: count_lines(handled_log) >= 1000, 120, "1000 events handled")
    if cut_by == "proxy":
        assert proxy.cut() == 1
    else:
        assert close_vhost_connections(vhost, "cut by test_broker_faults") == 1
    assert count_lines(handled_log) < len(ids), "the cut came after the last event"

    svc.wait_for_line(RECONNECT_LINE, timeout=30)
    svc.wait_for_line(f"consuming from {orders}-queue", timeout=60, count=2)
    wait_queue_empty(vhost, f"{orders}-queue", timeout=180)
    statsd_listener.wait_for(f"{orders}_reconnects", 1)
    statsd_listener.wait_for(f"{orders}_redelivered", 1)

    handled = Counter(read_handled(handled_log))
    calls = Counter(read_calls(calls_file))
    assert set(handled) == set(ids), f"never handled: {sorted(set(ids) - set(handled))[:5]}"
    assert_no_stale_tag_acks(svc)
    twice = [event_id for event_id, n in handled.items() if n > 1]
    assert not twice, f"{len(twice)} ids handled twice, e.g. {twice[:5]}"
    run_twice = [event_id for event_id, n in calls.items() if n > 1]
    assert not run_twice, (
        f"{len(run_twice)} ids had their handler run twice though the journal lists them once, "
        f"e.g. {run_twice[:5]}; etcd holds for the first: "
        f"{etcd_server.client().get(f'/service/{orders}/{run_twice[0]}')[0]!r}"
    )
    assert svc.count(RECONNECT_LINE) == 1
    assert svc.terminate() == 0


@pytest.mark.etcd
@pytest.mark.timeout(300)
def test_connection_cut_on_one_of_two_replicas_leaves_no_event_stuck_or_handled_twice(
    run_dedup_service: Callable[..., ServiceProcess],
    proxy: TcpProxy,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """Failure: replica A's connection is cut while B, on its own connection, goes on.

    The broker requeues A's unacked window and may hand it to B. Recovery expected: whatever
    A had claimed but not finished does not block B (A either finishes and records it, or lets
    go of its claim), so the queue drains with every event handled exactly once.
    """
    orders = unique_name("orders")
    handled_log, calls_file = tmp_path / "handled", tmp_path / "calls"
    ids = [f"cut2-{n:05d}" for n in range(4000)]
    publisher = Publisher(vhost)
    try:
        publisher.declare_topology(orders)
        publish_counted(publisher, ids, calls_file)
    finally:
        publisher.close()
    proxy.start()
    common = {
        "TEST_HANDLED_LOG": str(handled_log),
        "HANDLER_MODULES": "tests.handlers_for_tests",
        "PREFETCH": "50",
        "LOG_EVENTS": "false",
    }
    replica_a = run_dedup_service(orders, RABBIT_URL=proxy.url(vhost), **common)
    run_dedup_service(orders, **common)
    wait_until(lambda: count_lines(handled_log) >= 1000, 120, "1000 events handled")
    assert proxy.cut() == 1
    replica_a.wait_for_line(f"consuming from {orders}-queue", timeout=60, count=2)

    try:
        wait_queue_empty(vhost, f"{orders}-queue", timeout=90)
    finally:
        handled = Counter(read_handled(handled_log))
        never = sorted(set(ids) - set(handled))
        etcd = etcd_server.client()
        stuck = {i: etcd.get(f"/service/{orders}/{i}")[0] for i in never[:3]}
        assert not never, (
            f"{len(never)} ids never handled; etcd holds: {stuck}; replica A (cut) is pid "
            f"{replica_a.pid}"
        )
    calls = Counter(read_calls(calls_file))
    assert not [i for i, n in handled.items() if n > 1], handled.most_common(3)
    assert not [i for i, n in calls.items() if n > 1], calls.most_common(3)
    assert_no_stale_tag_acks(replica_a)


def test_rabbit_url_list_skips_a_dead_first_url_and_consumes_through_the_second(
    run_service: Callable[..., ServiceProcess], vhost: str, tmp_path: Path
) -> None:
    """Failure: the first broker address in RABBIT_URL refuses connections.

    Recovery expected: the daemon tries the next URL at once, consumes through it and handles
    events; the dead address alone is no reason to log a lost connection or to back off.
    """
    orders = unique_name("orders")
    handled_log = tmp_path / "handled"
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost.rsplit('/', 1)[1]}"
    started = time.monotonic()
    svc = run_service(orders, RABBIT_URL=f"{dead},{vhost}", TEST_HANDLED_LOG=str(handled_log))
    assert time.monotonic() - started < 20
    assert svc.count(RECONNECT_LINE) + svc.count(NO_BROKER_LINE) == 0, svc.tail()
    publisher = Publisher(vhost)
    try:
        publisher.publish({"type": "new_order", "id": "second-url-1"})
    finally:
        publisher.close()
    wait_until(lambda: read_handled(handled_log) == ["second-url-1"], 30, "the event handled")
    assert len(vhost_connections(vhost)) == 1
    assert svc.terminate() == 0


def test_every_url_that_failed_is_named_with_its_reason_and_the_worst_decides_the_advice(
    run_service: Callable[..., ServiceProcess], vhost: str
) -> None:
    """Failure: of two RABBIT_URLs, one refuses the login and the other the connection.

    Expected: one line per attempt naming both URLs (passwords redacted) and why each failed,
    however long, with the advice for the login; the daemon keeps retrying.
    """
    path = vhost.rsplit("/", 1)[1]
    wrong_login = f"amqp://guest:not-the-password@127.0.0.1:5672/{path}"
    dead = f"amqp://guest:not-the-password@127.0.0.1:{free_port()}/{path}"
    svc = run_service(unique_name("orders"), wait_ready=False, RABBIT_URL=f"{dead},{wrong_login}")
    line = svc.wait_for_line("RabbitMQ refused the login", timeout=30)
    assert f"{dead.replace(':not-the-password@', ':***@')}: [Errno 111] Connection refused" in line
    assert f"127.0.0.1:5672/{path}: ConnectionClosedByBroker: (403) 'ACCESS_REFUSED" in line
    assert "check the user and password in RABBIT_URL" in line
    assert "not-the-password" not in svc.text()
    assert svc.is_running()
    assert svc.terminate() == 0


def test_broker_outage_on_the_first_url_fails_over_to_the_second(
    run_service: Callable[..., ServiceProcess], proxy: TcpProxy, vhost: str, tmp_path: Path
) -> None:
    """Failure: the broker address the daemon is connected through goes down for good.

    Recovery expected: the daemon reconnects through the next URL of RABBIT_URL and goes on
    consuming, without waiting for the first address to come back.
    """
    orders = unique_name("orders")
    handled_log = tmp_path / "handled"
    proxy.start()
    svc = run_service(
        orders, RABBIT_URL=f"{proxy.url(vhost)},{vhost}", TEST_HANDLED_LOG=str(handled_log)
    )
    assert proxy.open_connections() == 1, "the daemon did not connect through the first URL"
    proxy.stop()
    svc.wait_for_line(f"consuming from {orders}-queue", timeout=60, count=2)
    assert proxy.open_connections() == 0
    publisher = Publisher(vhost)
    try:
        publisher.publish({"type": "new_order", "id": "failover-1"})
    finally:
        publisher.close()
    wait_until(lambda: read_handled(handled_log) == ["failover-1"], 30, "the event handled")
    assert svc.terminate() == 0


@pytest.mark.parametrize(
    ("declared", "argument"),
    [
        ("queue x-max-length", "x-max-length"),
        ("queue not durable", "durable"),
        ("dlq x-message-ttl", "x-message-ttl"),
    ],
)
def test_queue_declared_elsewhere_with_other_arguments_exits_3_with_one_clear_message(
    declared: str,
    argument: str,
    run_service: Callable[..., ServiceProcess],
    vhost: str,
) -> None:
    """Failure: ``<name>-queue`` (or ``<name>-dlq``) exists with arguments the daemon does not
    declare, so RabbitMQ answers the declaration with 406 PRECONDITION_FAILED.

    Recovery expected: none is possible by retrying, so the daemon does not loop: it exits
    with status 3 within seconds, after one CRITICAL line naming the queue, the argument in
    conflict and what to do about it.
    """
    orders = unique_name("orders")
    queue = f"{orders}-dlq" if declared.startswith("dlq") else f"{orders}-queue"
    arguments = {"x-max-length": 10} if argument == "x-max-length" else {}
    if argument == "x-message-ttl":
        arguments = {"x-message-ttl": 60000}
    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    try:
        connection.channel().queue_declare(
            queue, durable=argument != "durable", arguments=arguments or None
        )
    finally:
        connection.close()

    started = time.monotonic()
    svc = run_service(orders, wait_ready=False)
    assert svc.wait(timeout=30) == 3, svc.tail()
    assert time.monotonic() - started < 20
    critical = [line for line in svc.snapshot() if " CRITICAL " in line]
    assert len(critical) == 1, svc.tail()
    message = critical[0]
    assert repr(queue) in message or queue in message, message
    assert argument in message, message
    assert "delete" in message, f"no remedy given: {message}"
    assert svc.count("reconnecting") == 0, svc.tail()
    assert svc.count("connecting to RabbitMQ") == 1, svc.tail()
    assert "Traceback" not in svc.text(), svc.tail()
    # The queue the operator declared is left as it was.
    connection = pika.BlockingConnection(pika.URLParameters(vhost))
    try:
        connection.channel().queue_declare(
            queue, durable=argument != "durable", arguments=arguments or None, passive=True
        )
    finally:
        if connection.is_open:
            connection.close()
