"""The start-up warm-up reads a large history from etcd, page by page.

The original read the whole prefix in one request, which fails past gRPC's 4 MiB response cap
(a few tens of thousands of ids). 200,000 ids is well past it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    put_finished_ids,
    unique_name,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

FINISHED = 200_000
SAMPLE = 50


@pytest.mark.timeout(300)
def test_200000_finished_ids_are_warmed_up_and_skipped(
    request: pytest.FixtureRequest,
    etcd_server: EtcdServer,
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
) -> None:
    orders = unique_name("orders")
    etcd = etcd_server.client()
    request.addfinalizer(lambda: etcd.delete_prefix(f"/service/{orders}/"))
    ids = [f"order-{n:06d}" for n in range(FINISHED)]
    assert put_finished_ids(etcd, orders, ids) == FINISHED
    sample = [ids[0], ids[-1], *random.Random(7).sample(ids[1:-1], SAMPLE - 2)]

    svc = run_dedup_service(orders, wait_ready=False)
    svc.wait_for_line(f"warmed up {FINISHED} ids", timeout=180)
    svc.wait_ready()
    publisher.publish_orders(sample)

    assert statsd_listener.wait_for(f"{orders}_new_order_skipped", SAMPLE) == SAMPLE
    for event_id in (ids[0], ids[-1]):
        svc.wait_for_line(f"new_order id={event_id} skipped")
    assert statsd_listener.total(f"{orders}_new_order_ok") == 0
    assert not svc.matches(r"new_order id=\S+ ok$")
    log = svc.text()
    for symptom in ("RESOURCE_EXHAUSTED", "larger than max", "Traceback"):
        assert symptom not in log
