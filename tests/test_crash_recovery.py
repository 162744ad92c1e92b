"""A ``kill -9`` mid-stream costs at most the in-flight window, and loses nothing.

2,000 new_order events wait in the queue, 30% of them repeating an earlier id. The daemon is
killed once it has logged 500 ``ok`` lines, then started again and left to drain the queue.

Two views of "handled" are checked, in two tests:

- the daemon's own journal (``TEST_HANDLED_LOG``: one line per handled id, written right after
  the handler returns): every distinct id is in it, and at most PREFETCH ids twice;
- what a user reads: the ``new_order id=<id> ok`` log lines and the ``_new_order_ok`` counter of
  both runs together must also name every distinct id, within the same bound.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    read_handled,
    unique_name,
    wait_queue_empty,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

EVENTS = 2000
REPEAT_SHARE = 0.3
PREFETCH = 50
KILL_AFTER_OK = 500
OK_LINE = re.compile(r"\bnew_order id=(\S+) ok$")


@dataclass
class CrashRun:
    service: str
    distinct: set[str]
    first: ServiceProcess
    second: ServiceProcess
    journal: Path
    totals: dict[str, int]

    def ok_lines(self) -> Counter[str]:
        return Counter(ok_ids(self.first) + ok_ids(self.second))

    def journal_ids(self) -> Counter[str]:
        return Counter(read_handled(self.journal))

    def ok_total(self) -> int:
        return self.totals.get(f"{self.service}_new_order_ok", 0)

    def describe(self, event_id: str) -> str:
        """What both runs logged about one id."""
        return (
            f"about {event_id}: first run {lines_about(self.first, event_id)}, "
            f"second run {lines_about(self.second, event_id)}"
        )


def events_with_repeats(seed: int) -> list[str]:
    """EVENTS ids in publishing order; about REPEAT_SHARE of them reuse an earlier id."""
    rng = random.Random(seed)
    order: list[str] = []
    fresh = 0
    for _ in range(EVENTS):
        if order and rng.random() < REPEAT_SHARE:
            order.append(rng.choice(order))
        else:
            fresh += 1
            order.append(f"crash-{fresh:05d}")
    return order


def ok_ids(svc: ServiceProcess) -> list[str]:
    return [m[1] for m in svc.matches(OK_LINE)]


def lines_about(svc: ServiceProcess, event_id: str) -> list[str]:
    return [line.split(": ", 1)[-1] for line in svc.snapshot() if f"id={event_id} " in line + " "]


@pytest.fixture
def crash_and_recover(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    vhost: str,
    tmp_path: Path,
) -> Callable[[], CrashRun]:
    """Publish, run until KILL_AFTER_OK ok lines, SIGKILL, restart, drain the queue."""

    def run() -> CrashRun:
        orders = unique_name("orders")
        order = events_with_repeats(seed=2021)
        journal = tmp_path / "handled.txt"
        publisher.declare_topology(orders)
        publisher.publish_orders(order)
        settings = {
            "DEDUP_CLAIM_TTL": "2",
            "PREFETCH": str(PREFETCH),
            "TEST_HANDLED_LOG": str(journal),
        }
        killed = threading.Event()
        ok_lines_read = Counter[str]()

        def kill_midway(svc: ServiceProcess, line: str) -> None:
            # Runs on the log reader thread: SIGKILL the moment the threshold line is read.
            if killed.is_set() or not OK_LINE.search(line):
                return
            ok_lines_read["ok"] += 1
            if ok_lines_read["ok"] >= KILL_AFTER_OK:
                svc.process.kill()  # type: ignore[union-attr]
                killed.set()

        first = run_dedup_service(orders, on_line=kill_midway, **settings)
        assert killed.wait(timeout=180), f"never {KILL_AFTER_OK} ok lines:\n{first.tail()}"
        assert first.wait(timeout=30) == -9
        assert len(set(ok_ids(first))) < len(set(order)), "the kill came too late"

        second = run_dedup_service(orders, **settings)
        wait_queue_empty(publisher.url, f"{orders}-queue", timeout=240)
        totals = statsd_listener.wait_quiet(quiet_seconds=1.0, timeout=60)
        assert second.terminate() == 0
        return CrashRun(orders, set(order), first, second, journal, totals)

    return run


@pytest.mark.timeout(420)
def test_kill_9_midway_handles_every_id_and_repeats_at_most_the_prefetch_window(
    crash_and_recover: Callable[[], CrashRun],
) -> None:
    run = crash_and_recover()

    handled = run.journal_ids()
    never = sorted(run.distinct - set(handled))
    assert not never, f"{len(never)} ids never handled, e.g. {never[:5]}; {run.describe(never[0])}"
    assert set(handled) == run.distinct
    assert sum(handled.values()) <= len(run.distinct) + PREFETCH, handled.most_common(5)
    assert sum(run.ok_lines().values()) <= len(run.distinct) + PREFETCH
    assert run.ok_total() <= len(run.distinct) + PREFETCH, run.totals


@pytest.mark.timeout(420)
def test_kill_9_midway_still_logs_and_counts_every_id_ok(
    crash_and_recover: Callable[[], CrashRun], etcd_server: EtcdServer
) -> None:
    run = crash_and_recover()

    logged = run.ok_lines()
    never = sorted(run.distinct - set(logged))
    assert not never, (
        f"{len(never)} ids never logged ok, e.g. {never[:5]}; {run.describe(never[0])}; "
        f"etcd holds {etcd_server.client().get(f'/service/{run.service}/{never[0]}')[0]!r}"
    )
    assert len(run.distinct) <= run.ok_total() <= len(run.distinct) + PREFETCH, run.totals
