"""Handlers that fail or take long never lose an event, loop on it, or stop the daemon.

The event types come from ``tests/handlers_for_tests.py``, loaded with HANDLER_MODULES; each
handler appends the event's id to a calls file on every call, so the tests count the calls the
daemon made. De-duplication is on, so the etcd claim of each event can be checked too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.handlers_for_tests import read_calls
from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    rabbitmqctl,
    unique_name,
    vhost_of,
    wait_queue_empty,
    wait_until,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd, pytest.mark.timeout(90)]

HANDLERS = "tests.handlers_for_tests"
DEFAULT_MAX_ATTEMPTS = 5


def handled_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()]


def event(event_type: str, event_id: str, **args: Any) -> dict[str, Any]:
    return {"type": event_type, "id": event_id, "args": args}


def test_handler_failing_twice_then_succeeding_is_handled_once_not_dead_lettered(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """A transient handler failure is retried within the same delivery: the third call
    succeeds, so the event counts as handled once and never reaches the dead-letter queue."""
    service = unique_name("flaky")
    calls, handled_log = tmp_path / "calls", tmp_path / "handled.log"
    svc = run_dedup_service(service, HANDLER_MODULES=HANDLERS, TEST_HANDLED_LOG=str(handled_log))

    publisher.publish(event("flaky_order", "flaky-1", fail_times=2, calls_file=str(calls)))

    svc.wait_for_line("flaky_order id=flaky-1 ok")
    assert statsd_listener.wait_for(f"{service}_flaky_order_ok", 1) == 1
    assert read_calls(calls) == ["flaky-1"] * 3
    assert svc.count("failed on attempt") == 2
    assert handled_ids(handled_log) == ["flaky-1"]
    wait_queue_empty(vhost, f"{service}-queue", timeout=30)
    assert publisher.ready_count(f"{service}-dlq") == 0
    assert statsd_listener.total(f"{service}_dead_lettered") == 0
    assert etcd_server.client().get(f"/service/{service}/flaky-1")[0] == b"true"


def test_handler_that_always_fails_is_dead_lettered_its_claim_released_and_consuming_goes_on(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """A poison event whose handler never succeeds must not loop forever nor block the queue:
    after MAX_ATTEMPTS calls it goes to ``<name>-dlq`` with its reason, is counted, its claim
    is released (a republished copy is not held until the claim TTL), and the next event is
    handled as usual."""
    service = unique_name("poison")
    calls, handled_log = tmp_path / "calls", tmp_path / "handled.log"
    svc = run_dedup_service(service, HANDLER_MODULES=HANDLERS, TEST_HANDLED_LOG=str(handled_log))
    poison = event("always_failing", "poison-1", calls_file=str(calls))

    publisher.publish(poison)
    svc.wait_for_line("id=poison-1 to", timeout=30)  # "dead-lettered tag=1 id=poison-1 to ..."
    publisher.publish(event("new_order", "good-after-poison"))

    svc.wait_for_line("new_order id=good-after-poison ok")
    assert read_calls(calls) == ["poison-1"] * DEFAULT_MAX_ATTEMPTS
    assert statsd_listener.wait_for(f"{service}_dead_lettered", 1) == 1
    wait_queue_empty(vhost, f"{service}-queue", timeout=30)
    dead = publisher.drain(f"{service}-dlq")
    assert [json.loads(body) for body, _props in dead] == [poison]
    reason = (dead[0][1].headers or {}).get("x-reason", "")
    assert reason.startswith("handler-failed"), reason
    assert etcd_server.client().get(f"/service/{service}/poison-1")[0] is None
    assert etcd_server.client().get(f"/service/{service}/good-after-poison")[0] == b"true"
    assert handled_ids(handled_log) == ["good-after-poison"]
    assert statsd_listener.total(f"{service}_always_failing_ok") == 0
    assert statsd_listener.total(f"{service}_dead_lettered") == 1
    assert svc.is_running()


def test_slow_handler_keeps_the_connection_and_its_claim_alive(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """A handler that runs 8 s, four heartbeat intervals of 2 s: if the daemon stopped answering
    heartbeats meanwhile, the broker would drop the connection and requeue the event, which
    would then be handled again. The connection must survive, the event be acked once, and
    its claim (DEDUP_CLAIM_TTL=2) stay in etcd for the whole run, never expiring midway."""
    service = unique_name("slow")
    calls, handled_log = tmp_path / "calls", tmp_path / "handled.log"
    key = f"/service/{service}/slow-1"
    etcd = etcd_server.client()
    svc = run_dedup_service(
        service,
        RABBIT_URL=f"{vhost}?heartbeat=2",
        DEDUP_CLAIM_TTL="2",
        HANDLER_MODULES=HANDLERS,
        TEST_HANDLED_LOG=str(handled_log),
    )
    timeouts = rabbitmqctl("list_connections", "--quiet", "--no-table-headers", "vhost", "timeout")
    assert f"{vhost_of(vhost)}\t2" in timeouts.splitlines(), f"heartbeat not 2 s: {timeouts!r}"

    publisher.publish(event("slow_order", "slow-1", seconds=8, calls_file=str(calls)))
    wait_until(lambda: read_calls(calls), 15, "the slow handler to start")
    # Sample the key until the handler is done: it must never be absent on the way.
    values: list[bytes | None] = []

    def is_done() -> bool:
        values.append(etcd.get(key)[0])
        return bool(handled_ids(handled_log))

    wait_until(is_done, 30, "the slow handler to finish", interval=0.2)

    assert None not in values, f"the claim vanished while the handler ran: {values}"
    svc.wait_for_line("slow_order id=slow-1 ok")
    wait_queue_empty(vhost, f"{service}-queue", timeout=30)
    assert statsd_listener.wait_for(f"{service}_slow_order_ok", 1) == 1
    assert svc.count("connection lost") == 0, svc.tail()
    assert svc.count("slow_order id=slow-1 ok") == 1
    assert read_calls(calls) == ["slow-1"]
    assert handled_ids(handled_log) == ["slow-1"]
    assert statsd_listener.total(f"{service}_reconnects") == 0
    assert statsd_listener.total(f"{service}_redelivered") == 0
    assert etcd.get(key)[0] == b"true"
