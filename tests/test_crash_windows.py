"""What a ``kill -9`` costs at each point of one delivery's life, with de-duplication on.

The daemon is started with ``TEST_CRASH_AT=<point>`` and SIGKILLs itself the first time one
event reaches that point; it is then started again without the setting. ``TEST_HANDLED_LOG``
(one line per handled event, written before the id is recorded) says how often the event was
handled across both runs, and etcd says what was left behind at the crash and at the end.

The README's promise (guarantee 3): only a crash after handling and before the record costs a
duplicate; killed anywhere else, an event is either not acked and handled once after the
restart, or already recorded and skipped. In every case the key ``/service/<name>/<id>`` ends
``true`` and the queue ends empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    unique_name,
    wait_queue_empty,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd, pytest.mark.timeout(90)]

CLAIM_TTL = "2"
EVENT_ID = "crash-window-1"


@dataclass(frozen=True)
class CrashRun:
    """What a crash at one point left behind, and what the restarted daemon did."""

    service: str
    key_at_crash: bytes | None  #: the etcd value right after the crash (None: no key)
    key_at_end: bytes | None
    handled: list[str]  #: ids in TEST_HANDLED_LOG, both runs
    first: ServiceProcess
    second: ServiceProcess


def handled_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()]


@pytest.fixture
def crash_at(
    run_dedup_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    etcd_server: EtcdServer,
    vhost: str,
    tmp_path: Path,
) -> Callable[[str, str], CrashRun]:
    """Run one event into a crash at ``point``, restart, and wait for ``settled_line``."""

    def run(point: str, settled_line: str) -> CrashRun:
        service = unique_name("crash")
        key = f"/service/{service}/{EVENT_ID}"
        handled_log = tmp_path / "handled.log"
        settings = {"DEDUP_CLAIM_TTL": CLAIM_TTL, "TEST_HANDLED_LOG": str(handled_log)}
        etcd = etcd_server.client()
        first = run_dedup_service(service, TEST_CRASH_AT=point, **settings)

        publisher.publish({"type": "new_order", "id": EVENT_ID})

        assert first.wait(timeout=30) == -9, f"expected death by SIGKILL:\n{first.tail()}"
        # Read at once: a claim left behind lives for DEDUP_CLAIM_TTL after the kill.
        key_at_crash = etcd.get(key)[0]
        assert first.count(f"TEST_CRASH_AT={point} reached") == 1, first.tail()
        second = run_dedup_service(service, **settings)
        second.wait_for_line(f"new_order id={EVENT_ID} {settled_line}", timeout=45)
        wait_queue_empty(vhost, f"{service}-queue", timeout=30)
        return CrashRun(
            service=service,
            key_at_crash=key_at_crash,
            key_at_end=etcd.get(key)[0],
            handled=handled_ids(handled_log),
            first=first,
            second=second,
        )

    return run


def test_crash_after_delivery_handles_the_event_once_after_restart(
    crash_at: Callable[[str, str], CrashRun],
) -> None:
    """Killed with the delivery in hand but nothing claimed: the broker redelivers the unacked
    event to the restarted daemon, which handles it once."""
    run = crash_at("after-delivery", "ok")

    assert run.key_at_crash is None
    assert run.handled == [EVENT_ID]
    assert run.second.count(f"id={EVENT_ID} skipped") == 0
    assert run.key_at_end == b"true"


def test_crash_after_claim_lets_the_claim_expire_and_handles_the_event_once(
    crash_at: Callable[[str, str], CrashRun],
) -> None:
    """Killed holding a claim it never acted on: the claim must expire with the dead process's
    lease, so the redelivered event is handled once, not held or skipped forever."""
    run = crash_at("after-claim", "ok")

    assert run.key_at_crash is not None and run.key_at_crash != b"true", run.key_at_crash
    assert run.handled == [EVENT_ID]
    assert run.second.count(f"id={EVENT_ID} skipped") == 0
    assert run.key_at_end == b"true"


def test_crash_after_handle_before_record_handles_the_event_a_second_time(
    crash_at: Callable[[str, str], CrashRun],
) -> None:
    """Killed after the handler ran but before its id was recorded: the one window that costs
    a duplicate. The claim expires and the redelivered event is handled again, twice in all."""
    run = crash_at("after-handle", "ok")

    assert run.key_at_crash is not None and run.key_at_crash != b"true", run.key_at_crash
    assert run.handled == [EVENT_ID, EVENT_ID]
    assert run.key_at_end == b"true"


def test_crash_after_record_skips_the_redelivered_event(
    crash_at: Callable[[str, str], CrashRun],
    statsd_listener: StatsdListener,
) -> None:
    """Killed after the record but before the ack: the broker redelivers the event and the
    restarted daemon, which read the record at warm-up, skips it instead of handling it again."""
    run = crash_at("after-record", "skipped")

    assert run.key_at_crash == b"true"
    assert run.handled == [EVENT_ID]
    assert run.second.count(f"new_order id={EVENT_ID} ok") == 0
    assert statsd_listener.wait_for(f"{run.service}_new_order_skipped", 1) == 1
    # Counted ok once, by the first run, when its handler returned; never by the second.
    assert statsd_listener.total(f"{run.service}_new_order_ok") == 1
    assert run.key_at_end == b"true"
