"""The periodic summary line: the counts survive in the log when statsd packets are dropped."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from datetime import datetime

import pytest

from svc.config import load_settings
from svc.consumer import Consumer
from svc.dedup import DisabledStore
from svc.metrics import Metrics
from tests.support import (
    Publisher,
    ServiceProcess,
    StatsdListener,
    free_port,
    unique_name,
    wait_until,
)

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
    # A line is labelled with the interval, or with the real span when it came over a second
    # late (a busy machine).
    ok = sum(int(m[1]) for m in svc.matches(rf"last \d+ s: .*\b{name}_new_order_ok=(\d+)"))
    assert ok == 2, svc.tail()
    assert re.search(r"last \d+ s: ", line), line


def test_an_idle_service_still_logs_its_summary_line(
    run_service: Callable[..., ServiceProcess],
) -> None:
    """A quiet log must mean a stuck process, not an idle one: the summary says "no events"."""
    svc = run_service(unique_name("idle"), SUMMARY_INTERVAL="1")
    svc.wait_for_line(" s: no events", timeout=30)
    assert svc.is_running()


SUMMARY = re.compile(r"^(\S+ \S+) INFO svc\.consumer: last (\d+) s: (.*)$")


def test_summary_during_a_broker_outage_names_the_span_it_covers(
    run_service: Callable[..., ServiceProcess],
) -> None:
    """No broker: the reconnect waits grow past the interval, and each line that follows one
    says how long it really covers, with the reconnects counted."""
    svc = run_service(
        unique_name("outage"),
        wait_ready=False,
        RABBIT_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        SUMMARY_INTERVAL="1",
    )
    wait_until(lambda: len(svc.matches(SUMMARY)) >= 6, 60, "six summary lines")
    lines = [m for m in map(SUMMARY.match, svc.snapshot()) if m]
    stamps = [datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f") for m in lines]
    for before, after, line in zip(stamps, stamps[1:], lines[1:], strict=False):
        gap = (after - before).total_seconds()
        assert int(line[2]) >= gap - 1.0, f"a {gap:.1f} s span labelled {line[0]!r}"
    assert any(int(m[2]) >= 2 for m in lines), "the waits never outgrew the interval"
    assert all("_reconnects=" in m[3] for m in lines[1:]), [m[0] for m in lines]
    assert svc.is_running()


def test_a_late_summary_names_the_span_it_covers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Up to a second late, a line carries the interval; later than that, the real span."""
    clock = [1000.0]
    monkeypatch.setattr("svc.consumer.time.monotonic", lambda: clock[0])
    settings = load_settings(
        {"SERVICE_NAME": "span", "SUMMARY_INTERVAL": "20"}, dotenv_path=os.devnull
    )
    consumer = Consumer(settings, DisabledStore(), Metrics("span", "127.0.0.1", 8125))
    caplog.set_level(logging.INFO, logger="svc.consumer")
    for late in (0.6, 8.5, 5.2, 1.4, 0.0):
        clock[0] += 20 + late
        consumer.summarise()
    clock[0] += 19.9  # not due yet
    consumer.summarise()
    spans = re.findall(r"last (\d+) s: no events", caplog.text)
    assert spans == ["20", "28", "25", "21", "20"], caplog.text


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
