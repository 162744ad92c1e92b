"""SIGTERM while events flow: finish and record what is in hand, ack, exit 0, lose nothing.

After a graceful stop nothing may be handled twice: whatever the first run logged as ok was
recorded in etcd before it was acked, and whatever it had not finished went back to the queue
unhandled. So across both runs every id is ok exactly once.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.support import (
    Publisher,
    ServiceProcess,
    StatsdListener,
    unique_name,
    wait_queue_empty,
    wait_until,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

EVENTS = 3000
STOP_AFTER_OK = 300
STOP_WITHIN_SECONDS = 20.0
OK_LINE = re.compile(r"\bnew_order id=(\S+) ok$")


def ok_ids(svc: ServiceProcess) -> list[str]:
    return [m[1] for m in svc.matches(OK_LINE)]


def is_full(waiting: int, capacity: int) -> bool:
    # Lines are not packed across the pipe's 4 KiB pages, so a full pipe holds a bit less.
    return waiting >= capacity - 4096


@pytest.mark.timeout(300)
def test_sigterm_midstream_exits_0_and_every_id_is_ok_exactly_once(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    vhost: str,
) -> None:
    orders = unique_name("orders")
    ids = [f"stop-{n:05d}" for n in range(EVENTS)]
    publisher.declare_topology(orders)
    publisher.publish_orders(ids)
    signalled = threading.Event()
    signalled_at: list[float] = []
    ok_lines_read = Counter[str]()

    def stop_midway(svc: ServiceProcess, line: str) -> None:
        # Runs on the log reader thread, so SIGTERM lands while the daemon is still busy.
        if signalled.is_set() or not OK_LINE.search(line):
            return
        ok_lines_read["ok"] += 1
        if ok_lines_read["ok"] >= STOP_AFTER_OK:
            signalled_at.append(time.monotonic())
            svc.process.terminate()  # type: ignore[union-attr]
            signalled.set()

    first = run_dedup_service(orders, on_line=stop_midway)
    assert signalled.wait(timeout=120), f"never reached {STOP_AFTER_OK} ok lines:\n{first.tail()}"
    assert first.wait(timeout=STOP_WITHIN_SECONDS) == 0
    stopped_after = time.monotonic() - signalled_at[0]
    assert first.snapshot()[-1].endswith("stopped"), first.tail()
    first_ok = ok_ids(first)
    assert len(first_ok) < EVENTS, "the stop came too late to leave work behind"

    second = run_dedup_service(orders)
    wait_queue_empty(vhost, f"{orders}-queue", timeout=180)
    totals = statsd_listener.wait_quiet(quiet_seconds=1.0, timeout=60)
    assert second.terminate() == 0

    second_ok = ok_ids(second)
    again = sorted(set(first_ok) & set(second_ok))
    assert not again, f"{len(again)} ids handled in both runs, e.g. {again[:5]}"
    handled = Counter(first_ok + second_ok)
    assert set(handled) == set(ids), f"never ok: {sorted(set(ids) - set(handled))[:5]}"
    assert max(handled.values()) == 1, handled.most_common(5)
    assert totals.get(f"{orders}_new_order_ok") == EVENTS, totals
    assert stopped_after < STOP_WITHIN_SECONDS


@pytest.mark.timeout(180)
def test_sigterm_is_honoured_while_log_output_is_backed_up(
    run_dedup_service: Callable[..., ServiceProcess], publisher: Publisher, vhost: str
) -> None:
    """A slow reader of stderr (a pipe to a log shipper) must not make SIGTERM go unheard.

    The daemon is then blocked writing a log line when the signal arrives.
    """
    orders = unique_name("orders")
    publisher.declare_topology(orders)
    publisher.publish_orders(f"backed-up-{n:05d}" for n in range(EVENTS))
    paused, resume = threading.Event(), threading.Event()
    ok_lines_read = Counter[str]()

    def stop_reading_midway(svc: ServiceProcess, line: str) -> None:
        # Blocking the reader thread stops reading the pipe, which then fills up.
        if OK_LINE.search(line):
            ok_lines_read["ok"] += 1
            if ok_lines_read["ok"] == STOP_AFTER_OK:
                paused.set()
                resume.wait(timeout=120)

    first = run_dedup_service(orders, on_line=stop_reading_midway)
    assert paused.wait(timeout=120), f"never reached {STOP_AFTER_OK} ok lines:\n{first.tail()}"
    try:
        wait_until(lambda: is_full(*first.unread_output()), 60, "the log pipe to fill up")
        first.process.terminate()  # type: ignore[union-attr]
    finally:
        resume.set()

    assert first.wait(timeout=STOP_WITHIN_SECONDS) == 0
    assert first.snapshot()[-1].endswith("stopped"), first.tail()
    assert "Traceback" not in first.text()
    assert len(ok_ids(first)) < EVENTS
