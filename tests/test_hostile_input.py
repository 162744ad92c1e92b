"""Hostile input, as properties: whatever a publisher sends, the service's pure steps stay sound.

Every property runs a bounded, derandomized set of examples, so a run takes a few seconds and a
failure reproduces. What is checked: the decoder either accepts a body or refuses it with one of
its fixed codes and a reason that carries no event data; counter names from anywhere are sent
only as well-formed statsd lines; a handled type must be a plain metric name; the handled-ids
journal keeps one line per id; and no AMQP header table breaks pika's decoding.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pika.data
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from svc import amqp_fields
from svc.events import MAX_ID_CHARS, Event, InvalidEvent, decode
from svc.faults import HandledLog
from svc.handlers import HANDLERS, handles
from svc.metrics import Metrics
from tests.hostile_samples import (
    ANY_TEXT,
    NASTY_IDS,
    NASTY_KEYS,
    NASTY_NUMBERS,
    REFUSAL_CODES,
    unescape_line,
)

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    ANY_TEXT,
    st.sampled_from(NASTY_IDS),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


def dump(value: object) -> str:
    """JSON text for ``value``; lone surrogates become \\udxxx escapes, NaN stays a token."""
    return json.dumps(value, ensure_ascii=True)


@st.composite
def event_like_texts(draw: st.DrawFn) -> str:
    """A JSON object text with id/type/args keys in any case, repeated keys, any values."""
    pair = st.tuples(
        st.sampled_from(NASTY_KEYS) | ANY_TEXT,
        st.one_of(
            json_values.map(dump),
            st.sampled_from(NASTY_IDS).map(dump),
            st.sampled_from(["new_order", "ban_user", "unknown", "new_order\n"]).map(dump),
            st.sampled_from(NASTY_NUMBERS),
        ),
    )
    pairs = draw(st.lists(pair, max_size=6))
    return "{" + ",".join(f"{dump(key)}:{value}" for key, value in pairs) + "}"


def deep_nesting(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """Raw bytes, JSON of any shape, and event-like objects, in any of the encodings JSON meets."""
    text = draw(
        st.one_of(
            event_like_texts(),
            json_values.map(dump),
            st.integers(1, 5000).map(deep_nesting),
            st.sampled_from(NASTY_NUMBERS),
        )
    )
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32", "surrogatepass"]))
    if encoding == "surrogatepass":
        # A raw lone surrogate in the text: bytes that are not valid UTF-8.
        body = text.replace("\\ud800", "\ud800").encode("utf-8", "surrogatepass")
    else:
        body = text.encode(encoding)
    cut = draw(st.integers(0, len(body)))
    return body if draw(st.booleans()) else body[:cut]


def assert_accepted_or_refused(body: bytes) -> Event | None:
    """Decode ``body``; a refusal must carry a fixed code and a reason free of event data."""
    try:
        event = decode(body)
    except InvalidEvent as exc:
        assert exc.code in REFUSAL_CODES
        reason = f"{exc.code}: {exc.detail}"
        # x-reason and the dead-letter log line: one short printable ASCII line.
        assert reason.isascii() and reason.isprintable() and len(reason) <= 300, reason
        return None
    assert isinstance(event.id, str) and 0 < len(event.id) <= MAX_ID_CHARS
    assert isinstance(event.type, str) and event.type
    # Accepted text is real Unicode: it can become an etcd key and a log line.
    event.id.encode("utf-8")
    event.type.encode("utf-8")
    return event


@PROPERTY
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_are_accepted_or_refused_with_a_known_code(body: bytes) -> None:
    assert_accepted_or_refused(body)


@PROPERTY
@given(hostile_bodies())
def test_hostile_json_is_accepted_or_refused_with_a_known_code(body: bytes) -> None:
    assert_accepted_or_refused(body)


@st.composite
def events_with_extra_keys(draw: st.DrawFn) -> list[tuple[str, object]]:
    """An id and a type under keys in any case, with more keys (repeats included), shuffled."""
    type_pair = (
        draw(st.sampled_from(["type", "TYPE", "Type"])),
        draw(st.sampled_from(["new_order", "ban_user", "new_order\n", "x:1|c"]) | ANY_TEXT),
    )
    id_pair = (
        draw(st.sampled_from(["id", "ID", "iD"])),
        draw(st.sampled_from(NASTY_IDS) | ANY_TEXT | st.integers()),
    )
    extra = draw(st.lists(st.tuples(st.sampled_from(NASTY_KEYS), json_scalars), max_size=4))
    return draw(st.permutations([type_pair, id_pair, *extra]))


@PROPERTY
@given(events_with_extra_keys())
def test_an_accepted_event_carries_the_last_id_and_type_given_in_any_case(
    pairs: list[tuple[str, object]],
) -> None:
    body = ("{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in pairs) + "}").encode()
    event = assert_accepted_or_refused(body)
    if event is not None:
        last = {key.lower(): value for key, value in pairs}
        assert event.type == last["type"]
        assert event.id == str(last["id"])


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deep_nesting_inside_an_event_is_accepted_or_refused(depth: int) -> None:
    body = f'{{"type":"new_order","id":"deep","args":{deep_nesting(depth)}}}'.encode()
    assert_accepted_or_refused(body)


# --- counters -------------------------------------------------------------------------------

STATSD_COUNTER_LINE = re.compile(r"(?P<name>[A-Za-z0-9_.-]+):(?P<value>-?\d+)\|c")


@pytest.fixture(scope="module")
def udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def received_lines(sock: socket.socket, until: str) -> list[str]:
    """Every statsd line received up to and including the packet that carries ``until``."""
    lines: list[str] = []
    while True:
        packet = sock.recv(65535).decode("utf-8", "replace")
        lines.extend(packet.split("\n"))
        if until in packet:
            return lines


@PROPERTY
@given(suffix=ANY_TEXT | st.sampled_from(["ok\norders_new_order_ok:1000|c", "x:1|g", "a|b"]))
def test_any_counter_name_is_sent_only_as_one_wellformed_statsd_line(
    udp_socket: socket.socket, suffix: str
) -> None:
    metrics = Metrics("orders", "127.0.0.1", udp_socket.getsockname()[1])
    try:
        metrics.count(suffix)
        metrics.count("end_of_example")
        metrics.flush()
        lines = received_lines(udp_socket, "orders_end_of_example:")
    finally:
        metrics.close()
    for line in lines:
        match = STATSD_COUNTER_LINE.fullmatch(line)
        assert match, f"malformed statsd line {line!r} from suffix {suffix!r}"
        assert match["name"].startswith("orders_")
    names = {STATSD_COUNTER_LINE.fullmatch(line)["name"] for line in lines}  # type: ignore[index]
    if re.fullmatch(r"[A-Za-z0-9_.-]+", suffix):
        assert f"orders_{suffix}" in names


@PROPERTY
@given(ANY_TEXT)
def test_only_plain_metric_names_can_have_a_handler(event_type: str) -> None:
    assume(event_type not in HANDLERS)
    try:
        handles(event_type)(lambda event: None)
    except ValueError:
        assert not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", event_type)
        return
    HANDLERS.pop(event_type)
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", event_type)


# --- the handled-ids journal ------------------------------------------------------------------


@contextmanager
def journal_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:
        yield os.path.join(directory, "handled")


@PROPERTY
@given(st.lists(st.text(max_size=20) | st.sampled_from(NASTY_IDS[:20]), max_size=8))
def test_the_journal_has_one_line_per_handled_id_whatever_the_id(ids: list[str]) -> None:
    ids = [i for i in ids if i and "\ud800" not in i]  # the decoder refuses the rest
    with journal_path() as path:
        journal = HandledLog("orders", path)
        journal.write(ids)
        journal.close()
        with open(path, encoding="utf-8") as written:
            lines = written.read().split("\n")
    assert lines[-1] == ""
    assert [unescape_line(line.removeprefix("orders ")) for line in lines[:-1]] == ids


# --- AMQP headers -----------------------------------------------------------------------------


def short_string(raw: bytes) -> bytes:
    return struct.pack("B", len(raw[:255])) + raw[:255]


field_values = st.one_of(
    st.integers(0, 2**64 - 1).map(lambda s: b"T" + struct.pack(">Q", s)),
    st.floats().map(lambda f: b"d" + struct.pack(">d", f)),
    st.floats(width=32).map(lambda f: b"f" + struct.pack(">f", f)),
    st.sampled_from([math.nan, math.inf, -math.inf]).map(lambda f: b"d" + struct.pack(">d", f)),
    st.binary(max_size=20).map(lambda b: b"S" + struct.pack(">I", len(b)) + b),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: b"I" + struct.pack(">i", i)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: b"l" + struct.pack(">q", i)),
    st.tuples(st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)).map(
        lambda d: b"D" + struct.pack(">Bi", *d)
    ),
    st.just(b"V"),
)


def encode_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    payload = b"".join(short_string(key) + value for key, value in entries)
    return struct.pack(">I", len(payload)) + payload


# Keys are any bytes: pika keeps a key that is not UTF-8 as bytes.
tables = st.recursive(
    st.lists(st.tuples(st.binary(max_size=12), field_values), max_size=5),
    lambda inner: st.lists(
        st.tuples(st.binary(max_size=12), inner.map(lambda t: b"F" + encode_table(t))), max_size=3
    ),
    max_leaves=8,
)


@PROPERTY
@given(tables)
def test_no_header_table_breaks_decoding_and_the_copy_is_sent_only_if_encodable(
    entries: list[tuple[bytes, bytes]],
) -> None:
    amqp_fields.install()
    encoded = encode_table(entries)
    headers, offset = pika.data.decode_table(encoded, 0)
    assert offset == len(encoded)
    if amqp_fields.encodable_headers(headers):
        pieces: list[bytes] = []
        pika.data.encode_table(pieces, headers)
        again, _ = pika.data.decode_table(b"".join(pieces), 0)
        assert again.keys() == headers.keys()
