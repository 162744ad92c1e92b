"""The periodic summary line: the counts survive in the log when statsd packets are dropped."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import Publisher, ServiceProcess, unique_name

pytestmark = pytest.mark.rabbit


def test_summary_line_reports_the_interval_counts(
    run_service: Callable[..., ServiceProcess], publisher: Publisher
) -> None:
    """Counters go out over UDP, which may drop them; every SUMMARY_INTERVAL the log repeats
    what was counted in that interval, by metric name."""
    name = unique_name("summary")
    svc = run_service(name, SUMMARY_INTERVAL="1", STATSD_HOST="no-such-host.invalid")
    publisher.publish({"type": "new_order", "id": "s-1"})
    publisher.publish({"type": "new_order", "id": "s-2"})
    publisher.publish({"type": "mystery", "id": "s-3"})
    publisher.publish(b"not json")

    line = svc.wait_for_line(f"{name}_invalid=1", timeout=30)
    # All four deliveries may land in one interval or straddle two: add the intervals up.
    svc.wait_for_line(f"{name}_unknown_type=1", timeout=30)
    ok = sum(
        int(m.group(1)) for m in svc.matches(rf"last 1 s: .*\b{name}_new_order_ok=(\d+)")
    )
    assert ok == 2, svc.tail()
    assert "last 1 s:" in line
