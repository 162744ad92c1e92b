"""etcd stops answering while events flow: the daemon pauses, acks nothing unrecorded, resumes.

Each test runs its own etcd (so it may freeze, kill or restart it) and gives the daemon
ETCD_TIMEOUT=1 and an AMQP heartbeat of 2 s: a pause that failed to service the connection
would cost it within a few seconds, and the broker would show a new connection afterwards.

While etcd is away, "nothing is acked" is read from the broker: the queue's ready + unacked
count must not move, and the daemon must keep holding deliveries (unacked > 0). Afterwards
every id in the TEST_HANDLED_LOG journal must be recorded as ``true`` in etcd, and each
distinct id handled exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.handlers_for_tests import read_calls
from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    TcpProxy,
    count_lines,
    free_port,
    queue_depth,
    read_handled,
    restart_etcd,
    unique_name,
    vhost_connections,
    wait_queue_empty,
    wait_until,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

EVENTS = 4000
REPEAT_SHARE = 0.2
FAULT_AFTER_HANDLED = 1000
HEARTBEAT_SECONDS = 2
# The outage must outlast two heartbeat intervals, when the broker gives up on a silent peer.
MIN_OUTAGE_SECONDS = 3 * HEARTBEAT_SECONDS
PAUSED = "consumption paused"
RESUMED = "etcd answers again; consumption resumes"
RECONNECT_LINE = "broker connection lost"


@dataclass
class Run:
    """One daemon consuming EVENTS published events, against a private etcd."""

    name: str
    svc: ServiceProcess
    etcd: EtcdServer
    vhost: str
    handled_log: Path
    published: list[str]

    @property
    def queue(self) -> str:
        return f"{self.name}-queue"

    def in_queue(self) -> tuple[int, int]:
        return queue_depth(self.vhost, self.queue)

    def records(self) -> dict[str, bytes]:
        prefix = f"/service/{self.name}/"
        etcd = self.etcd.client()
        return {meta.key.decode()[len(prefix) :]: value for value, meta in etcd.get_prefix(prefix)}


def ids_with_repeats(seed: int, prefix: str) -> list[str]:
    rng = random.Random(seed)
    order: list[str] = []
    for n in range(EVENTS):
        order.append(
            rng.choice(order) if order and rng.random() < REPEAT_SHARE else f"{prefix}-{n:05d}"
        )
    return order


def start_run(
    run_service: Callable[..., ServiceProcess],
    etcd: EtcdServer,
    vhost: str,
    tmp_path: Path,
    endpoints: str | None = None,
) -> Run:
    name = unique_name("orders")
    published = ids_with_repeats(seed=len(name), prefix=name)
    publisher = Publisher(vhost)
    try:
        publisher.declare_topology(name)
        publisher.publish_orders(published)
    finally:
        # Closed before the fault, so the only connection left in the vhost is the daemon's.
        publisher.close()
    handled_log = tmp_path / "handled"
    svc = run_service(
        name,
        ENABLE_ETCD="true",
        ETCD_ENDPOINTS=endpoints or etcd.endpoint,
        ETCD_TIMEOUT="1",
        RABBIT_URL=f"{vhost}?heartbeat={HEARTBEAT_SECONDS}",
        TEST_HANDLED_LOG=str(handled_log),
        PREFETCH="50",
        LOG_EVENTS="false",
        SUMMARY_INTERVAL="1",
    )
    return Run(name, svc, etcd, vhost, handled_log, published)


def ride_out_outage(run: Run, end_outage: Callable[[], None]) -> None:
    """With etcd already away: check the daemon pauses and acks nothing, then end the outage.

    Waits until the daemon has reported the failure a few times and the outage has lasted
    MIN_OUTAGE_SECONDS, then calls ``end_outage`` and waits for the resume line.
    """
    run.svc.wait_for_line(PAUSED, timeout=30)
    paused_at = time.monotonic()
    handled_then, depth_then = count_lines(run.handled_log), run.in_queue()
    connections_then = vhost_connections(run.vhost)
    assert handled_then < EVENTS * (1 - REPEAT_SHARE) - 200, "the fault came after the work"
    assert depth_then[1] > 0, f"the daemon holds no delivery while etcd is away: {depth_then}"

    wait_until(
        lambda: run.svc.count(PAUSED) >= 3 and time.monotonic() - paused_at > MIN_OUTAGE_SECONDS,
        60,
        "three failed etcd attempts",
    )
    depth_now = run.in_queue()
    assert sum(depth_now) == sum(depth_then), (
        f"deliveries were acked while etcd was away: (ready, unacked) went from {depth_then} "
        f"to {depth_now}"
    )
    assert depth_now[1] > 0
    assert count_lines(run.handled_log) == handled_then, "events were handled while paused"
    assert run.svc.count(RESUMED) == 0
    # The summary goes on during the outage, when its counts matter most.
    summaries = run.svc.matches(rf"last \d+ s: .*\b{run.name}_dedup_errors=[1-9]")
    assert len(summaries) >= 2, f"no summary line while etcd was away:\n{run.svc.tail()}"

    end_outage()
    run.svc.wait_for_line(RESUMED, timeout=60)
    assert vhost_connections(run.vhost) == connections_then, "the AMQP connection was replaced"


def assert_all_handled_once_and_recorded(run: Run, statsd: StatsdListener) -> None:
    wait_queue_empty(run.vhost, run.queue, timeout=120)
    handled = Counter(read_handled(run.handled_log))
    distinct = set(run.published)
    assert set(handled) == distinct, f"never handled: {sorted(distinct - set(handled))[:5]}"
    twice = [i for i, n in handled.items() if n > 1]
    assert not twice, f"{len(twice)} ids handled twice, e.g. {twice[:5]}"
    records = run.records()
    unrecorded = [i for i in handled if records.get(i) != b"true"]
    assert not unrecorded, (
        f"handled but not recorded: {[(i, records.get(i)) for i in unrecorded[:5]]}"
    )
    assert run.svc.count(RECONNECT_LINE) == 0, run.svc.tail()
    statsd.wait_for(f"{run.name}_dedup_errors", 1)
    statsd.wait_for(f"{run.name}_new_order_skipped", len(run.published) - len(distinct))
    assert run.svc.is_running()
    assert run.svc.terminate() == 0


@pytest.mark.timeout(300)
def test_etcd_frozen_midstream_pauses_consumption_keeps_the_connection_and_resumes(
    request: pytest.FixtureRequest,
    run_service: Callable[..., ServiceProcess],
    etcd_factory: Callable[[], EtcdServer],
    statsd_listener: StatsdListener,
    vhost: str,
    tmp_path: Path,
) -> None:
    """Failure: etcd hangs (SIGSTOP): connections stay open, requests never answer.

    Recovery expected: each etcd call gives up after ETCD_TIMEOUT; the daemon stops taking new
    work and acks nothing whose record is not written, keeps the AMQP connection alive with
    heartbeats, and, once etcd answers again (SIGCONT), resumes by itself: every event handled
    once and recorded.
    """
    etcd = etcd_factory()
    run = start_run(run_service, etcd, vhost, tmp_path)
    assert etcd.process is not None
    wait_until(lambda: count_lines(run.handled_log) >= FAULT_AFTER_HANDLED, 120, "work in progress")
    pid = etcd.process.pid

    def resume() -> None:
        if etcd.is_running():
            os.kill(pid, signal.SIGCONT)

    os.kill(pid, signal.SIGSTOP)
    request.addfinalizer(resume)

    ride_out_outage(run, resume)
    assert_all_handled_once_and_recorded(run, statsd_listener)


@pytest.mark.timeout(300)
def test_etcd_killed_and_restarted_midstream_pauses_consumption_and_resumes(
    run_service: Callable[..., ServiceProcess],
    etcd_factory: Callable[[], EtcdServer],
    statsd_listener: StatsdListener,
    vhost: str,
    tmp_path: Path,
) -> None:
    """Failure: etcd dies (SIGKILL): every call is refused at once, until it is back.

    Recovery expected: the daemon pauses with growing, capped retries instead of spinning,
    acks nothing unrecorded, keeps its AMQP connection, and resumes by itself once etcd is
    restarted on the same address with the same data: every event handled once and recorded.
    """
    etcd = etcd_factory()
    run = start_run(run_service, etcd, vhost, tmp_path)
    wait_until(lambda: count_lines(run.handled_log) >= FAULT_AFTER_HANDLED, 120, "work in progress")
    etcd.kill()

    ride_out_outage(run, lambda: restart_etcd(etcd))
    assert_all_handled_once_and_recorded(run, statsd_listener)


@pytest.mark.timeout(180)
def test_broker_cut_while_a_handled_event_waits_for_etcd_does_not_handle_it_again(
    request: pytest.FixtureRequest,
    run_service: Callable[..., ServiceProcess],
    etcd_factory: Callable[[], EtcdServer],
    vhost: str,
    tmp_path: Path,
) -> None:
    """Failure: etcd hangs right after a handler ran, so the id cannot be recorded; while the
    daemon waits for etcd, its broker connection is cut too, and the delivery is requeued.

    Recovery expected: the handler's work is not thrown away: the daemon keeps trying to
    record the id and reconnects only once etcd answered and the record is durable, so the
    redelivered copy is skipped. The event is handled once.
    """
    etcd = etcd_factory()
    assert etcd.process is not None
    pid = etcd.process.pid

    def resume() -> None:
        if etcd.is_running():
            os.kill(pid, signal.SIGCONT)

    proxy = TcpProxy().start()
    request.addfinalizer(proxy.stop)
    name = unique_name("orders")
    handled_log, calls_file = tmp_path / "handled", tmp_path / "calls"
    svc = run_service(
        name,
        ENABLE_ETCD="true",
        ETCD_ENDPOINTS=etcd.endpoint,
        ETCD_TIMEOUT="1",
        RABBIT_URL=proxy.url(vhost),
        TEST_HANDLED_LOG=str(handled_log),
        HANDLER_MODULES="tests.handlers_for_tests",
        PREFETCH="1",
    )
    publisher = Publisher(vhost)
    try:
        publisher.publish(
            {
                "type": "slow_order",
                "id": "wait-1",
                "args": {"seconds": 2, "calls_file": str(calls_file)},
            }
        )
    finally:
        publisher.close()
    # The handler has started (it notes the call first, then sleeps 2 s): freeze etcd now, so
    # the claim is made and the record cannot be.
    wait_until(lambda: read_calls(calls_file) == ["wait-1"], 30, "the handler to start")
    os.kill(pid, signal.SIGSTOP)
    request.addfinalizer(resume)
    svc.wait_for_line("etcd record failed", timeout=30)
    assert read_handled(handled_log) == ["wait-1"]

    assert proxy.cut() == 1
    svc.wait_for_line(RECONNECT_LINE, timeout=30)
    # It settles the handled id in etcd before it reconnects, so it waits for etcd first.
    resume()
    svc.wait_for_line(f"consuming from {name}-queue", timeout=60, count=2)
    wait_queue_empty(vhost, f"{name}-queue", timeout=60)
    assert read_calls(calls_file) == ["wait-1"], (
        f"the handler ran {len(read_calls(calls_file))} times; journal: {read_handled(handled_log)}"
    )
    assert read_handled(handled_log) == ["wait-1"]
    assert etcd.client().get(f"/service/{name}/wait-1")[0] == b"true"


@pytest.mark.timeout(180)
def test_dead_first_etcd_endpoint_fails_over_to_the_second(
    run_service: Callable[..., ServiceProcess],
    etcd_factory: Callable[[], EtcdServer],
    statsd_listener: StatsdListener,
    vhost: str,
    tmp_path: Path,
) -> None:
    """Failure: the first of two ETCD_ENDPOINTS refuses connections from the start.

    Recovery expected: the daemon warms up, claims and records through the second endpoint:
    every event handled once, every id recorded there, repeats skipped.
    """
    etcd = etcd_factory()
    endpoints = f"127.0.0.1:{free_port()},{etcd.endpoint}"
    run = start_run(run_service, etcd, vhost, tmp_path, endpoints=endpoints)
    wait_queue_empty(run.vhost, run.queue, timeout=120)
    handled = Counter(read_handled(run.handled_log))
    assert set(handled) == set(run.published)
    assert max(handled.values()) == 1, handled.most_common(3)
    records = run.records()
    assert all(records.get(i) == b"true" for i in handled), "handled ids missing from etcd"
    statsd_listener.wait_for(
        f"{run.name}_new_order_skipped", len(run.published) - len(set(run.published))
    )
    # The dead endpoint is named in its own line, but etcd did answer: no "no etcd answers".
    assert run.svc.count("no etcd answers") == 0, run.svc.tail()
    assert run.svc.terminate() == 0


def test_no_etcd_at_start_is_said_once_naming_the_setting(
    run_service: Callable[..., ServiceProcess],
) -> None:
    """Failure: nothing answers at ETCD_ENDPOINTS when the daemon starts.

    Expected: it keeps retrying the warm-up (one line per attempt, naming the endpoint) and says
    once what to do: which setting it read, how to start a local etcd, or how to switch off.
    """
    dead = f"127.0.0.1:{free_port()}"
    svc = run_service(
        unique_name("orders"),
        wait_ready=False,
        ENABLE_ETCD="true",
        ETCD_ENDPOINTS=dead,
        ETCD_TIMEOUT="1",
    )
    svc.wait_for_line("retrying the warm-up", timeout=30, count=3)
    hint = svc.wait_for_line(f"no etcd answers at ETCD_ENDPOINTS={dead}", timeout=5)
    assert "ENABLE_ETCD=false" in hint, hint
    assert svc.count("no etcd answers") == 1
    assert svc.is_running()
    assert svc.terminate() == 0

