"""A batch of hostile messages against the real daemon: each ends in exactly one known place.

With de-duplication on (a private etcd), a real RabbitMQ vhost and a real statsd UDP socket, a
seeded mix of valid events with hostile ids, repeats, unknown and look-alike types, bodies the
decoder must refuse, fuzzed bytes, a header pika cannot decode and events whose handler always
fails is published. Each message must end handled (``_ok``, once per id, in the journal and in
etcd), skipped (``_skipped``), ignored (``_unknown_type`` and an "ignored (unknown type)" log
line) or dead-lettered (in ``<service>-dlq`` with a known ``x-reason``), and the counts must add
up to what was published. Nothing may escape: etcd keys stay under ``/service/<service>/``,
statsd lines keep their grammar, the vhost keeps its two queues, and no log line is forged.
"""

from __future__ import annotations

import json
import random
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.data
import pytest

from tests.hostile_samples import NASTY_IDS, REFUSAL_CODES, unescape_line
from tests.support import (
    EtcdServer,
    Publisher,
    ServiceProcess,
    StatsdListener,
    rabbitmqctl,
    read_handled,
    unique_name,
    vhost_of,
    wait_queue_empty,
    wait_until,
)

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

MAX_BODY = 1024 * 1024
DAEMON_HEADERS = {
    "x-reason",
    "x-original-exchange",
    "x-original-routing-key",
    "x-original-headers-dropped",
}
SETTLED_SUFFIXES = ("_ok", "_skipped", "_unknown_type", "_invalid", "_dead_lettered")
FORGED = "2026-01-01 00:00:00,000 ERROR svc: FORGED"
# A timestamp header past the year 9999: RabbitMQ passes it on, pika's decoder cannot convert it.
FAR_TIMESTAMP = b"T" + struct.pack(">Q", 2**63)


class RawField(bytes):
    """An AMQP field value published as these exact bytes (type octet first)."""


@pytest.fixture
def raw_header_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process publish :class:`RawField` header values that pika would not encode."""
    encode_value = pika.data.encode_value

    def encode_raw_too(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, RawField):
            pieces.append(bytes(value))
            return len(value)
        return encode_value(pieces, value)

    monkeypatch.setattr(pika.data, "encode_value", encode_raw_too)


class RawStatsdListener(StatsdListener):
    """A statsd listener that also keeps every line as it arrived."""

    def __init__(self) -> None:
        self.raw_lines: list[str] = []
        super().__init__()

    def _record(self, data: bytes) -> None:
        self.raw_lines.extend(data.decode("utf-8", "backslashreplace").split("\n"))
        super()._record(data)


@pytest.fixture
def statsd_listener() -> Iterator[StatsdListener]:
    listener = RawStatsdListener()
    yield listener
    listener.close()


def event(event_type: str, event_id: Any, **extra: Any) -> bytes:
    return json.dumps({"type": event_type, "id": event_id, **extra}).encode()


def padded(event_id: str, size: int) -> bytes:
    head = event("new_order", event_id)[:-1] + b', "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def hostile_valid_ids() -> list[str]:
    """Ids the decoder accepts, each unlike the others byte for byte."""
    ids = [i for i in NASTY_IDS if "\ud800" not in i and 0 < len(i) <= 256]
    ids += [f"x\n{FORGED}", "ABC", "abc", "\u0430bc", "\t", "\x1b[31mred", "=cmd|' /C calc'!A0"]
    return list(dict.fromkeys(ids))


# (body, reason code): bodies the decoder must refuse.
REFUSED = [
    (b"\xff\xfe\xfd not utf-8 at all", "invalid-json"),
    (b'{"type":"new_order","id":"\xc3\x28"}', "invalid-json"),
    # A surrogate as raw UTF-8: Python's JSON decoder lets it through, the id check does not.
    (b'{"type":"new_order","id":"\xed\xa0\x80"}', "bad-id"),
    (b'{"type":"new_order","id":"cut', "invalid-json"),
    (b"[" * 50_000, "invalid-json"),
    (b'{"type":"new_order","id":' + b"9" * 5000 + b"}", "invalid-json"),
    (b'"../x"', "not-an-object"),
    (b"null", "not-an-object"),
    (b'{"id":"no-type"}', "missing-type"),
    (b'{"type":"","id":"empty-type"}', "bad-type"),
    (b'{"type":"\\udc00","id":"surrogate-type"}', "bad-type"),
    (b'{"type":"new_order"}', "missing-id"),
    (b'{"type":"new_order","id":""}', "empty-id"),
    (b'{"type":"new_order","id":"\\ud800"}', "bad-id"),
    (b'{"type":"new_order","id":NaN}', "invalid-json"),  # not JSON, as in Go
    (b'{"type":"new_order","id":{"$ne":null}}', "bad-id"),
    (b'{"type":"new_order","id":' + b"9" * 300 + b"}", "id-too-long"),
    (event("new_order", "\U0001f600" * 257), "id-too-long"),
    (padded("too-large", MAX_BODY + 1), "too-large"),
    (padded("far-too-large", 2 * MAX_BODY), "too-large"),
]
UNKNOWN_TYPES = ["new_order\n", "NEW_ORDER", "new_\u043erder", "new_order:1|c", "../new_order", "*"]


def fuzzed_bodies(rng: random.Random, count: int) -> list[bytes]:
    """Random bytes, and valid events with flipped, cut or re-encoded bytes."""
    bodies = []
    for n in range(count):
        base = event(rng.choice(["new_order", "ban_user"]), f"fuzz-{n}")
        kind = n % 5
        if kind == 0:
            body = rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:
            body = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body)
        elif kind == 2:
            body = base[: rng.randrange(len(base))]
        elif kind == 3:
            body = json.dumps({"type": "new_order", "id": f"fuzz-{n}"}).encode(
                rng.choice(["utf-16", "utf-32", "utf-8-sig"])
            )
        else:
            body = base.replace(b'"id"', rng.choice([b'"Id"', b'"ID"', b'"\xc4\xb0d"', b'"id "']))
        bodies.append(body)
    return bodies


def test_every_hostile_message_ends_handled_skipped_ignored_or_dead_lettered(
    run_service: Callable[..., ServiceProcess],
    etcd_factory: Callable[[], EtcdServer],
    publisher: Publisher,
    statsd_listener: RawStatsdListener,
    vhost: str,
    tmp_path: Path,
    raw_header_fields: None,
) -> None:
    name = unique_name("hostile")
    etcd = etcd_factory()
    journal = tmp_path / "handled"
    svc = run_service(
        name,
        ENABLE_ETCD="true",
        ETCD_ENDPOINTS=etcd.endpoint,
        TEST_HANDLED_LOG=str(journal),
        HANDLER_MODULES="tests.handlers_for_tests",
        MAX_ATTEMPTS="2",
    )
    rng = random.Random(2021)

    valid_ids = hostile_valid_ids()
    messages = [event("new_order", i) for i in valid_ids]
    messages += [event("ban_user", f"ban/{n}") for n in range(5)]
    repeats = [event("new_order", rng.choice(valid_ids)) for _ in range(30)]
    messages += repeats
    messages += [event(t, f"unknown-{n}") for n, t in enumerate(UNKNOWN_TYPES)]
    messages += [body for body, _ in REFUSED]
    failing = [event("always_failing", i) for i in ["fail\n" + FORGED, "fail\x00"]]
    messages += failing
    messages += fuzzed_bodies(rng, 150)
    rng.shuffle(messages)

    for body in messages:
        publisher.publish(body)
    # One valid and one refused event, each with a header value pika cannot decode.
    poisoned = [event("new_order", "far-future-header"), b"far-future-header, not json"]
    for body in poisoned:
        publisher.channel.basic_publish(
            "events",
            "foo",
            body,
            pika.BasicProperties(delivery_mode=2, headers={"far": RawField(FAR_TIMESTAMP)}),
            mandatory=True,
        )
    published = len(messages) + len(poisoned)

    def settled() -> int:
        totals = statsd_listener.totals()
        return sum(n for metric, n in totals.items() if metric.endswith(SETTLED_SUFFIXES))

    wait_until(lambda: settled() >= published, 30, f"{published} messages settled")
    wait_queue_empty(vhost, f"{name}-queue", timeout=10)
    totals = statsd_listener.wait_quiet(0.5, timeout=10)
    assert settled() == published, totals

    # Handled: each valid id once, in the journal and in etcd, and nowhere else in etcd.
    handled = Counter(unescape_line(i) for i in read_handled(journal))
    expected_handled = {*valid_ids, *(f"ban/{n}" for n in range(5)), "far-future-header"}
    assert expected_handled <= handled.keys()
    assert max(handled.values()) == 1, handled.most_common(3)
    keys = [meta.key for _, meta in etcd.client().get_all()]
    prefix = f"/service/{name}/".encode()
    assert all(key.startswith(prefix) for key in keys), [
        k for k in keys if not k.startswith(prefix)
    ]
    assert {key[len(prefix) :].decode("utf-8") for key in keys} == set(handled)

    # Skipped, ignored and dead-lettered, by their counters.
    skipped = sum(n for metric, n in totals.items() if metric.endswith("_skipped"))
    assert skipped >= len(repeats)
    assert totals.get(f"{name}_unknown_type", 0) >= len(UNKNOWN_TYPES)
    assert svc.count("ignored (unknown type)") == totals[f"{name}_unknown_type"]
    # A look-alike type is logged escaped, so it cannot pass for the real one.
    assert svc.count("'new_\\u043erder' id=unknown-2 ignored (unknown type)") == 1
    assert totals.get(f"{name}_dead_lettered", 0) == len(failing)
    ok = sum(n for metric, n in totals.items() if metric.endswith("_ok"))
    assert ok == sum(handled.values())

    # Dead-lettered: every refused body with its reason, and nothing else in the queue.
    dead = publisher.drain(f"{name}-dlq")
    assert len(dead) == totals.get(f"{name}_invalid", 0) + len(failing)
    reasons = {body: (props.headers or {}) for body, props in dead}
    for body, code in REFUSED:
        assert reasons[body]["x-reason"].startswith(f"{code}: "), (body[:60], reasons[body])
    for body in failing:
        assert reasons[body]["x-reason"].startswith("handler-failed: InjectedFailure after 2")
    assert "x-original-headers-dropped" in reasons[poisoned[1]]
    for body, headers in reasons.items():
        assert set(headers) <= DAEMON_HEADERS, (body[:60], headers)
        assert headers["x-reason"].split(":")[0] in REFUSAL_CODES | {"handler-failed"}
        assert headers["x-reason"].isascii() and headers["x-reason"].isprintable()

    # Nothing escaped into statsd lines, queue names or log lines.
    name_pattern = re.compile(
        rf"{re.escape(name)}_(new_order|ban_user|always_failing)_(ok|skipped)"
        rf"|{re.escape(name)}_(unknown_type|invalid|dead_lettered)"
    )
    for line in statsd_listener.raw_lines:
        if line:
            metric, _, rest = line.partition(":")
            assert name_pattern.fullmatch(metric) and re.fullmatch(r"\d+\|c", rest), line
    queues = rabbitmqctl("list_queues", "-p", vhost_of(vhost), "--quiet", "--no-table-headers")
    assert sorted(row.split("\t")[0] for row in queues.splitlines()) == sorted(
        [f"{name}-dlq", f"{name}-queue"]
    )
    assert not [line for line in svc.snapshot() if line.startswith(FORGED[:23])]
    assert svc.count("broker connection lost") == 0, svc.tail()

    # Still alive and consuming.
    assert svc.is_running()
    publisher.publish({"type": "new_order", "id": "after-the-storm"})
    svc.wait_for_line("new_order id=after-the-storm ok", timeout=15)
