"""With DEDUP_TTL, what the daemon remembers is bounded: records expire in etcd and in memory.

README, guarantee 6: a record vanishes after DEDUP_TTL (through a lease), the in-memory set
forgets the id too, and the id then counts as new again. A long run of distinct ids must
therefore leave neither etcd nor the process's memory holding all of them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from tests.support import (
    EXCHANGE,
    ROUTING_KEY,
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    unique_name,
    wait_queue_empty,
    wait_until,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]


def handled_count(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handled:
        return sum(1 for _ in handled)


def wait_handled(path: Path, count: int, timeout: float) -> None:
    wait_until(lambda: handled_count(path) >= count, timeout, f"{count} handled ids", 0.2)


def rss_bytes(pid: int) -> int:
    """The resident set size of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match[1]) * 1024


@pytest.mark.timeout(90)
def test_id_is_handled_again_once_its_record_has_expired(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    etcd_server: EtcdServer,
    tmp_path: Path,
) -> None:
    """DEDUP_TTL=3: within the TTL a repeat is skipped; after it, the record is gone from etcd
    (its lease expired), the daemon has forgotten the id as well, and a repeat is handled."""
    ttl = 3
    service = unique_name("ttl")
    key = f"/service/{service}/ttl-1"
    etcd = etcd_server.client()
    handled_log = tmp_path / "handled.log"
    svc = run_dedup_service(service, DEDUP_TTL=str(ttl), TEST_HANDLED_LOG=str(handled_log))

    publisher.publish({"type": "new_order", "id": "ttl-1"})
    svc.wait_for_line("new_order id=ttl-1 ok")
    recorded_at = time.monotonic()
    publisher.publish({"type": "new_order", "id": "ttl-1"})
    svc.wait_for_line("new_order id=ttl-1 skipped")
    value, meta = etcd.get(key)
    assert value == b"true" and meta.lease_id != 0, (value, meta)
    wait_until(lambda: etcd.get(key)[0] is None, 3 * ttl, "the record to expire", interval=0.1)
    lived = time.monotonic() - recorded_at
    publisher.publish({"type": "new_order", "id": "ttl-1"})

    svc.wait_for_line("new_order id=ttl-1 ok", count=2, timeout=15)
    assert lived >= ttl - 0.5, f"the record vanished {lived:.1f} s after it was written"
    assert handled_count(handled_log) == 2
    assert svc.count("new_order id=ttl-1 skipped") == 1
    assert statsd_listener.wait_for(f"{service}_new_order_ok", 2) == 2
    assert statsd_listener.total(f"{service}_new_order_skipped") == 1
    # "ok" is logged when the handler returns; the record follows before the ack.
    wait_until(lambda: etcd.get(key)[0] == b"true", 10, "the new record", interval=0.1)


def bulk_publish(url: str, bodies: list[bytes]) -> None:
    """Publish fast, without per-message confirms; return once the broker has routed them all.

    The passive declare at the end is a synchronous call on the same channel: the broker
    answers it only after the publishes sent before it on that channel.
    """
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for body in bodies:
            channel.basic_publish(EXCHANGE, ROUTING_KEY, body)
        channel.exchange_declare(EXCHANGE, passive=True)
    finally:
        connection.close()


ID_CHARS = 200  # long ids make an unbounded set visible in the RSS
WAVES = 6
PER_WAVE = 10_000


@pytest.mark.timeout(120)
def test_memory_stays_flat_over_many_distinct_ids_with_a_short_ttl(
    run_dedup_service: Callable[..., ServiceProcess],
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> None:
    """60,000 distinct ids in waves, DEDUP_TTL=2: without expiry the in-memory set and etcd
    would keep every id, so RSS would grow by the size of the ids of the later waves. With it,
    RSS after the last wave stays near RSS after the second, and etcd keeps only recent ids."""
    service = unique_name("bounded")
    handled_log = tmp_path / "handled.log"
    svc = run_dedup_service(
        service, DEDUP_TTL="2", LOG_EVENTS="false", TEST_HANDLED_LOG=str(handled_log)
    )
    etcd = etcd_server.client()
    rss_after: list[int] = []

    def keys_kept() -> int:
        return int(etcd.get_prefix_response(f"/service/{service}/", count_only=True).count)

    for wave in range(WAVES):
        ids = [f"w{wave}-{n:05d}-".ljust(ID_CHARS, "x") for n in range(PER_WAVE)]
        bulk_publish(vhost, [b'{"type":"new_order","id":"%s"}' % i.encode() for i in ids])
        wait_handled(handled_log, (wave + 1) * PER_WAVE, timeout=60)
        rss_after.append(rss_bytes(svc.pid))
        # The next wave starts once this one's records have expired in etcd.
        wait_until(lambda: keys_kept() == 0, 15, f"the records of wave {wave} to expire", 0.2)

    wait_queue_empty(vhost, f"{service}-queue", timeout=30)
    assert handled_count(handled_log) == WAVES * PER_WAVE
    # The first wave also warms up what a run needs once (thread pools, gRPC and allocator
    # buffers: 1-2 MiB here): growth is measured from the second.
    growth = rss_after[-1] - rss_after[1]
    unbounded = (WAVES - 2) * PER_WAVE * ID_CHARS  # the later waves' ids alone, as str data
    assert growth < unbounded / 2, (
        f"RSS grew {growth / 2**20:.1f} MiB from the second wave to the last (keeping every "
        f"later id would take over {unbounded / 2**20:.1f} MiB); RSS after each wave in MiB: "
        f"{[round(r / 2**20, 1) for r in rss_after]}"
    )
    assert svc.is_running()
