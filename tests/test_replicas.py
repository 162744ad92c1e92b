"""Several replicas of one service share its queue and still handle every id exactly once.

Replicas are ``python -m svc`` processes with the same SERVICE_NAME and ENABLE_ETCD=true: the
broker spreads ``<name>-queue`` over them, and the claim in etcd decides which one handles an
id. Each replica writes its own TEST_HANDLED_LOG, so the tests can tell who handled what.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    TcpProxy,
    unique_name,
    wait_queue_empty,
    wait_until,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd, pytest.mark.timeout(90)]

REPLICAS = 3
HANDLERS = "tests.handlers_for_tests"
SKIPPED_LINE = re.compile(r"\bnew_order id=(\S+) skipped$")


def handled_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()]


def copies_of_ids(distinct: int, seed: int) -> list[str]:
    """Each of ``distinct`` ids two or three times, shuffled so copies are spread out."""
    rng = random.Random(seed)
    order = [f"rep-{n:04d}" for n in range(distinct) for _ in range(rng.choice((2, 3)))]
    rng.shuffle(order)
    return order


def finished_keys(etcd_server: EtcdServer, service: str) -> dict[str, bytes]:
    prefix = f"/service/{service}/"
    return {
        meta.key.decode()[len(prefix) :]: value
        for value, meta in etcd_server.client().get_prefix(prefix)
    }


def test_three_replicas_handle_each_repeated_id_exactly_once(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """Copies of one id land on different replicas, sometimes at the same moment: the etcd
    claim must let exactly one replica handle it while every other copy is skipped, wherever
    it lands, and the queue must drain."""
    service = unique_name("replicas")
    order = copies_of_ids(distinct=600, seed=1500)
    distinct = set(order)
    logs = [tmp_path / f"handled-{n}.log" for n in range(REPLICAS)]
    replicas = [
        run_dedup_service(service, PREFETCH="25", TEST_HANDLED_LOG=str(log)) for log in logs
    ]

    publisher.publish_orders(order)

    wait_queue_empty(vhost, f"{service}-queue", timeout=60)
    handled_by = [handled_ids(log) for log in logs]
    handled = Counter(event_id for ids in handled_by for event_id in ids)
    assert set(handled) == distinct, f"never handled: {sorted(distinct - set(handled))[:5]}"
    assert [i for i, n in handled.items() if n > 1] == [], handled.most_common(5)
    skipped_by = [[m[1] for m in replica.matches(SKIPPED_LINE)] for replica in replicas]
    assert sum(map(len, skipped_by)) == len(order) - len(distinct)
    totals = statsd_listener.wait_quiet(quiet_seconds=1.0, timeout=30)
    assert totals.get(f"{service}_new_order_ok") == len(distinct), totals
    assert totals.get(f"{service}_new_order_skipped") == len(order) - len(distinct), totals
    # The run proves something only if replicas shared the work and copies crossed over.
    assert all(handled_by), [len(ids) for ids in handled_by]
    owner = {event_id: n for n, ids in enumerate(handled_by) for event_id in ids}
    crossed = sum(owner[i] != n for n, ids in enumerate(skipped_by) for i in ids)
    assert crossed > 0, "no copy was skipped by a replica other than the one that handled it"
    keys = finished_keys(etcd_server, service)
    assert set(keys) == distinct and set(keys.values()) == {b"true"}
    assert all(replica.is_running() for replica in replicas)


def test_replica_killed_holding_claims_loses_nothing_and_repeats_at_most_its_window(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """One of three replicas is SIGKILLed while it holds claims on events it is handling. The
    broker requeues its unacked events at once, but the others must wait for its claims to
    expire (DEDUP_CLAIM_TTL), then handle them: nothing is lost, and only the events it had
    in flight, at most PREFETCH, may be handled twice."""
    prefetch = 10
    service = unique_name("replicas")
    ids = [f"slow-{n:04d}" for n in range(900)]
    logs = [tmp_path / f"handled-{n}.log" for n in range(REPLICAS)]
    victim, *survivors = [
        run_dedup_service(
            service,
            HANDLER_MODULES=HANDLERS,
            PREFETCH=str(prefetch),
            DEDUP_CLAIM_TTL="2",
            TEST_HANDLED_LOG=str(log),
        )
        for log in logs
    ]
    etcd = etcd_server.client()
    prefix = f"/service/{service}/"

    def victims_claims() -> list[str]:
        # A claim's value is a token naming the process that holds it (README, guarantee 2).
        mark = f":{victim.pid}:".encode()
        return [
            meta.key.decode()[len(prefix) :]
            for value, meta in etcd.get_prefix(prefix)
            if value != b"true" and mark in value
        ]

    for event_id in ids:
        publisher.publish({"type": "slow_order", "id": event_id, "args": {"seconds": 0.02}})
    wait_until(lambda: len(handled_ids(logs[0])) >= 3 * prefetch, 30, "the victim to be busy")
    wait_until(victims_claims, 10, "the victim to hold claims", interval=0.02)
    victim.kill()
    held_at_death = victims_claims()

    assert held_at_death, "the victim's claims vanished at once instead of after their TTL"
    wait_queue_empty(vhost, f"{service}-queue", timeout=60)
    by_victim = set(handled_ids(logs[0]))
    by_survivors = Counter(i for log in logs[1:] for i in handled_ids(log))
    assert set(by_survivors) | by_victim == set(ids), "some events were never handled"
    assert [i for i, n in by_survivors.items() if n > 1] == []
    assert set(held_at_death) <= set(by_survivors), "the dead replica's claims were not taken over"
    repeated = by_victim & set(by_survivors)
    assert len(repeated) <= prefetch, sorted(repeated)
    assert repeated <= set(held_at_death), "a repeat outside the victim's in-flight window"
    keys = finished_keys(etcd_server, service)
    assert set(keys) == set(ids) and set(keys.values()) == {b"true"}
    assert all(s.is_running() and s.count("connection lost") == 0 for s in survivors)


def test_claim_applied_but_unanswered_then_broker_lost_is_released_for_another_replica(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """etcd carries out replica A's claim but its answer is lost; while A retries, A loses its
    broker connection, and the event goes to replica B. A must release that claim before it
    reconnects: A's lease stays alive, so a claim left behind would hold the event forever."""
    service = unique_name("replicas")
    to_etcd = TcpProxy(target=("127.0.0.1", etcd_server.client_port)).start()
    to_broker = TcpProxy().start()
    try:
        log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
        settings = {"PREFETCH": "1", "DEDUP_CLAIM_TTL": "3", "ETCD_TIMEOUT": "2"}
        replica_a = run_dedup_service(
            service,
            RABBIT_URL=to_broker.url(vhost),
            ETCD_ENDPOINTS=f"127.0.0.1:{to_etcd.port}",
            TEST_HANDLED_LOG=str(log_a),
            **settings,
        )
        publisher.publish({"type": "new_order", "id": "first"})
        wait_until(
            lambda: finished_keys(etcd_server, service) == {"first": b"true"},
            30,
            "A to handle and record a first event (so it holds a live claim lease)",
        )

        to_etcd.drop_replies = True
        publisher.publish({"type": "new_order", "id": "unanswered"})
        replica_a.wait_for_line("etcd claim failed", timeout=30)
        replica_b = run_dedup_service(service, TEST_HANDLED_LOG=str(log_b), **settings)
        assert to_broker.cut() >= 1
        to_etcd.drop_replies = False

        wait_until(lambda: "unanswered" in handled_ids(log_b), 30, "B to handle the event")
        wait_queue_empty(vhost, f"{service}-queue", timeout=30)
        assert handled_ids(log_a) == ["first"]
        assert handled_ids(log_b) == ["unanswered"]
        assert finished_keys(etcd_server, service) == {"first": b"true", "unanswered": b"true"}
        assert replica_a.is_running() and replica_b.is_running()
    finally:
        to_etcd.stop()
        to_broker.stop()


def test_broker_lost_while_the_next_batch_is_claimed_ahead_releases_that_claim(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """A claims the next batch while it still handles the one before; its broker connection
    goes while that slow handler runs, and A cannot reconnect. A must release the claim it made
    ahead before giving up the connection: its lease stays alive, so that claim would hold the
    event from replica B for as long as A lives."""
    service = unique_name("replicas")
    calls = tmp_path / "calls"
    publisher.declare_topology(service)
    publisher.publish(
        {"type": "slow_order", "id": "slow", "args": {"seconds": 3, "calls_file": str(calls)}}
    )
    publisher.publish({"type": "new_order", "id": "claimed-ahead"})
    to_broker = TcpProxy().start()
    try:
        log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
        # A batch holds one delivery (PREFETCH / 5); an unreleased claim would outlive the test.
        settings = {"PREFETCH": "5", "DEDUP_CLAIM_TTL": "120", "HANDLER_MODULES": HANDLERS}
        run_dedup_service(
            service, RABBIT_URL=to_broker.url(vhost), TEST_HANDLED_LOG=str(log_a), **settings
        )
        wait_until(lambda: calls.exists(), 30, "A to start the slow handler")
        wait_until(
            lambda: finished_keys(etcd_server, service).get("claimed-ahead", b"true") != b"true",
            10,
            "A to claim the next event while the slow one runs",
        )
        to_broker.stop()  # A's connection is gone and stays gone
        run_dedup_service(service, TEST_HANDLED_LOG=str(log_b), **settings)

        wait_until(lambda: "claimed-ahead" in handled_ids(log_b), 30, "B to handle the event")
        wait_queue_empty(vhost, f"{service}-queue", timeout=30)
        assert handled_ids(log_a) == ["slow"]  # recorded before A let go: B skips its copy
        assert handled_ids(log_b) == ["claimed-ahead"]
        assert finished_keys(etcd_server, service) == {"slow": b"true", "claimed-ahead": b"true"}
    finally:
        to_broker.stop()
