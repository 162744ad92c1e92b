"""The periodic summary line: the counts survive in the log when statsd packets are dropped."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import Publisher, ServiceProcess, StatsdListener, unique_name

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
    ok = sum(int(m.group(1)) for m in svc.matches(rf"last 1 s: .*\b{name}_new_order_ok=(\d+)"))
    assert ok == 2, svc.tail()
    assert "last 1 s:" in line


def test_an_idle_service_still_logs_its_summary_line(
    run_service: Callable[..., ServiceProcess],
) -> None:
    """A quiet log must mean a stuck process, not an idle one: the summary says "no events"."""
    svc = run_service(unique_name("idle"), SUMMARY_INTERVAL="1")
    svc.wait_for_line("last 1 s: no events", timeout=30)
    assert svc.is_running()


def test_per_event_lines_are_capped_under_load_and_the_rest_counted(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
) -> None:
    """At most LOG_EVENTS_PER_SECOND per-event lines a second (the default, 100): a burst is
    still counted in full in statsd, and a line says how many lines were left out."""
    name = unique_name("burst")
    svc = run_service(name, LOG_EVENTS_PER_SECOND="100")
    events = 600
    for n in range(events):
        publisher.publish({"type": "new_order", "id": f"b-{n}"})
    assert statsd_listener.wait_for(f"{name}_new_order_ok", events) == events
    svc.wait_for_line("event lines left out", timeout=10)

    written = len(svc.matches(r"received id=b-\d+ ")) + len(svc.matches(r"id=b-\d+ ok$"))
    left_out = sum(int(m.group(1)) for m in svc.matches(r"(\d+) event lines left out"))
    assert written < 2 * events, svc.tail()
    assert written + left_out == 2 * events, svc.tail()  # two lines per event, none uncounted
