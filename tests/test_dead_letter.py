"""Bad input reaches ``<name>-dlq`` with its reason and is counted; it never stops the daemon.

The codes in ``x-reason`` are the contract; what follows the colon is free text.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support import Publisher, ServiceProcess, StatsdListener, unique_name, wait_queue_empty

pytestmark = pytest.mark.rabbit

MAX_BODY = 1024 * 1024


def padded_event(event_id: str, size: int) -> bytes:
    """A valid new_order event whose body is exactly ``size`` bytes long."""
    head = f'{{"type": "new_order", "id": "{event_id}", "pad": "'.encode()
    tail = b'"}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body


# (reason code, body); every body is distinct so each dead letter can be matched to its source.
BAD_BODIES = [
    ("invalid-json", b"this is not json"),
    ("invalid-json", b'{"type": "new_order", "id": "cut-short"'),
    ("invalid-json", b'\xff\xfe{"type": "new_order", "id": "bad-utf8"}'),
    ("not-an-object", b"[1, 2, 3]"),
    ("not-an-object", b'"new_order"'),
    ("missing-type", b'{"id": "no-type"}'),
    ("bad-type", b'{"type": 7, "id": "number-type"}'),
    ("missing-id", b'{"type": "new_order"}'),
    ("empty-id", b'{"type": "new_order", "id": ""}'),
    ("bad-id", b'{"type": "new_order", "id": ["list"]}'),
    ("bad-id", b'{"type": "new_order", "id": true}'),
    ("bad-id", b'{"type": "new_order", "id": 1.5}'),
    ("id-too-long", json.dumps({"type": "new_order", "id": "i" * 257}).encode()),
    ("too-large", padded_event("too-large", MAX_BODY + 1)),
]


def test_each_kind_of_bad_body_is_dead_lettered_with_its_reason(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    vhost: str,
) -> None:
    orders = unique_name("orders")
    svc = run_service(orders)

    for _code, body in BAD_BODIES:
        publisher.publish(body)
    publisher.publish({"type": "new_order", "id": "good-after-bad"})

    svc.wait_for_line("new_order id=good-after-bad ok")
    assert statsd_listener.wait_for(f"{orders}_new_order_ok", 1) == 1
    assert statsd_listener.wait_for(f"{orders}_invalid", len(BAD_BODIES)) == len(BAD_BODIES)
    wait_queue_empty(vhost, f"{orders}-queue", timeout=30)
    dead = {body: props for body, props in publisher.drain(f"{orders}-dlq")}
    assert len(dead) == len(BAD_BODIES)
    for code, body in BAD_BODIES:
        assert body in dead, f"{code} body {body[:60]!r} not in the dead-letter queue"
        reason = (dead[body].headers or {}).get("x-reason", "")
        assert reason.startswith(f"{code}: "), f"{body[:60]!r}: x-reason {reason!r}"
        assert dead[body].delivery_mode == 2
    assert svc.is_running()


def test_events_at_the_limits_are_handled_not_dead_lettered(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    vhost: str,
) -> None:
    orders = unique_name("orders")
    svc = run_service(orders)

    publisher.publish(padded_event("exactly-1mib", MAX_BODY))
    publisher.publish({"type": "new_order", "id": "j" * 256})
    publisher.publish(b'{"type": "new_order", "id": 42}')
    publisher.publish(b'{"TYPE": "new_order", "Id": "mixed-case", "ARGS": {"sku": 1}}')

    assert statsd_listener.wait_for(f"{orders}_new_order_ok", 4) == 4
    svc.wait_for_line("new_order id=exactly-1mib ok")
    svc.wait_for_line("new_order id=42 ok")
    svc.wait_for_line("new_order id=mixed-case ok")
    wait_queue_empty(vhost, f"{orders}-queue", timeout=30)
    assert statsd_listener.total(f"{orders}_invalid") == 0
    assert publisher.ready_count(f"{orders}-dlq") == 0


def test_a_bad_body_is_not_acked_until_its_dead_letter_queue_takes_it(
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    statsd_listener: StatsdListener,
    vhost: str,
) -> None:
    """Failure: ``<name>-dlq`` was deleted under the running daemon, so the broker returns the
    dead letter. Recovery: the bad body stays unacked, the daemon reconnects, declares the queue
    again, and the redelivered body is dead-lettered there."""
    orders = unique_name("orders")
    svc = run_service(orders)
    publisher.channel.queue_delete(f"{orders}-dlq")

    publisher.publish(b"not json, and nowhere to go")

    svc.wait_for_line("returned 1 dead letter(s)")
    wait_queue_empty(vhost, f"{orders}-queue", timeout=30)
    dead = publisher.drain(f"{orders}-dlq")
    assert [body for body, _ in dead] == [b"not json, and nowhere to go"]
    assert (dead[0][1].headers or {})["x-reason"].startswith("invalid-json: ")
    assert svc.is_running()
