"""The talk's three demo scenarios, end to end: real broker, real etcd, statsd over UDP.

Two services (``orders-…`` and ``notify-…``) share one vhost and so one ``events`` exchange,
as in the talk; each test uses fresh service names so its counters and etcd keys are its own.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    unique_name,
    wait_queue_empty,
)

pytestmark = pytest.mark.rabbit


def new_order(event_id: str) -> dict[str, str]:
    return {"type": "new_order", "id": event_id}


def test_each_service_counts_an_event_once(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
) -> None:
    orders, notify = unique_name("orders"), unique_name("notify")
    services = [run_service(orders), run_service(notify)]
    for name in (orders, notify):
        # The zero counts at start make the series exist before any event.
        statsd_listener.wait_seen(f"{name}_new_order_ok")
        statsd_listener.wait_seen(f"{name}_new_order_skipped")

    publisher.publish(new_order("123"))

    for svc in services:
        svc.wait_for_line("new_order id=123 ok")
    for name in (orders, notify):
        assert statsd_listener.wait_for(f"{name}_new_order_ok", 1) == 1
        assert statsd_listener.total(f"{name}_new_order_skipped") == 0


def test_stopped_service_catches_up_after_restart(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    vhost: str,
) -> None:
    orders, notify = unique_name("orders"), unique_name("notify")
    run_service(orders)
    first_notify = run_service(notify)
    publisher.publish(new_order("1"))
    statsd_listener.wait_for(f"{orders}_new_order_ok", 1)
    statsd_listener.wait_for(f"{notify}_new_order_ok", 1)

    assert first_notify.terminate() == 0
    first_notify.wait_for_line("stopped")
    publisher.publish(new_order("2"))
    statsd_listener.wait_for(f"{orders}_new_order_ok", 2)
    assert statsd_listener.total(f"{notify}_new_order_ok") == 1
    assert publisher.ready_count(f"{notify}-queue") == 1

    second_notify = run_service(notify)

    second_notify.wait_for_line("new_order id=2 ok")
    assert statsd_listener.wait_for(f"{notify}_new_order_ok", 2) == 2
    wait_queue_empty(vhost, f"{notify}-queue", timeout=30)
    assert second_notify.count("new_order id=1 ok") == 0


@pytest.mark.etcd
def test_repeated_id_is_skipped_with_etcd_also_after_restart(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    etcd_server: EtcdServer,
) -> None:
    orders = unique_name("orders")
    ok, skipped = f"{orders}_new_order_ok", f"{orders}_new_order_skipped"
    first = run_dedup_service(orders)
    first.wait_for_line("warmed up 0 ids")

    publisher.publish(new_order("123"))
    publisher.publish(new_order("123"))
    statsd_listener.wait_for(skipped, 1)
    assert statsd_listener.wait_for(ok, 1) == 1
    assert first.terminate() == 0

    second = run_dedup_service(orders)
    second.wait_for_line("warmed up 1 ids")
    publisher.publish(new_order("123"))

    second.wait_for_line("new_order id=123 skipped")
    assert statsd_listener.wait_for(skipped, 2) == 2
    assert statsd_listener.total(ok) == 1
    assert second.count("new_order id=123 ok") == 0
    value, _meta = etcd_server.client().get(f"/service/{orders}/123")
    assert value == b"true"


def test_repeated_id_is_handled_again_without_etcd(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
) -> None:
    orders = unique_name("orders")
    svc = run_service(orders, ENABLE_ETCD="false")

    publisher.publish(new_order("123"))
    publisher.publish(new_order("123"))

    svc.wait_for_line("new_order id=123 ok", count=2)
    assert statsd_listener.wait_for(f"{orders}_new_order_ok", 2) == 2
    assert statsd_listener.total(f"{orders}_new_order_skipped") == 0


def test_ban_user_and_unknown_types_are_counted_and_acked(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    vhost: str,
) -> None:
    orders = unique_name("orders")
    run_service(orders)

    publisher.publish({"type": "ban_user", "id": "u-1"})
    publisher.publish({"type": "refund", "id": "r-1"})
    publisher.publish({"type": "refund", "id": "r-2"})

    assert statsd_listener.wait_for(f"{orders}_ban_user_ok", 1) == 1
    assert statsd_listener.wait_for(f"{orders}_unknown_type", 2) == 2
    assert not any(name.startswith(f"{orders}_refund") for name in statsd_listener.totals())
    wait_queue_empty(vhost, f"{orders}-queue", timeout=30)
    assert publisher.ready_count(f"{orders}-dlq") == 0
