"""The decoder: what counts as a usable event, and the reason given for everything else."""

from __future__ import annotations

import json

import pytest

from svc.events import MAX_BODY_BYTES, Event, InvalidEvent, decode


def test_decodes_the_talks_example_event() -> None:
    assert decode(b'{"type":"new_order","id":"123"}') == Event(id="123", type="new_order")


def test_keys_match_in_any_case_and_args_are_kept() -> None:
    event = decode(b'{"TYPE":"ban_user","Id":"u1","ARGS":{"user":5}}')
    assert event == Event(id="u1", type="ban_user", args={"user": 5})


def test_integer_id_is_taken_as_its_decimal_string() -> None:
    assert decode(b'{"type":"new_order","id":42}').id == "42"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid-json"),
        (b"\xff\xfe\x00garbage", "invalid-json"),
        (b"[" * 100_000, "invalid-json"),
        (b'["type","id"]', "not-an-object"),
        (b'"just a string"', "not-an-object"),
        (b'{"id":"1"}', "missing-type"),
        (b'{"type":5,"id":"1"}', "bad-type"),
        (b'{"type":"","id":"1"}', "bad-type"),
        (b'{"type":"new_order"}', "missing-id"),
        (b'{"type":"new_order","id":""}', "empty-id"),
        (b'{"type":"new_order","id":true}', "bad-id"),
        (b'{"type":"new_order","id":null}', "bad-id"),
        (b'{"type":"new_order","id":1.5}', "bad-id"),
        (b'{"type":"new_order","id":["1"]}', "bad-id"),
        (b'{"type":"new_order","id":"\\ud800"}', "bad-id"),
        (json.dumps({"type": "new_order", "id": "x" * 257}).encode(), "id-too-long"),
        # Not JSON, though Python's own decoder takes them; Go's refuses them too.
        (b'{"type":"new_order","id":"1","args":NaN}', "invalid-json"),
        (b'{"type":"new_order","id":"1","args":[-Infinity]}', "invalid-json"),
        (b'{"type":"new_order","ID":"1","id":"2","x":Infinity}', "invalid-json"),
        # Python would read these as infinity; Go refuses them.
        (b'{"type":"new_order","id":"1","args":{"total":1e999}}', "invalid-json"),
        (b'{"type":"new_order","id":"1","x":-1e400}', "invalid-json"),
    ],
)
def test_unusable_bodies_are_rejected_with_their_reason(body: bytes, code: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode(body)
    assert caught.value.code == code


def test_body_over_one_mebibyte_is_too_large_even_if_valid_json() -> None:
    padding = "x" * MAX_BODY_BYTES
    body = json.dumps({"type": "new_order", "id": "1", "args": padding}).encode()
    with pytest.raises(InvalidEvent) as caught:
        decode(body)
    assert caught.value.code == "too-large"


def test_id_of_exactly_256_characters_is_accepted() -> None:
    assert len(decode(json.dumps({"type": "t", "id": "y" * 256}).encode()).id) == 256


def test_path_like_id_is_kept_verbatim() -> None:
    # The etcd key is "/service/<name>/" + id: the id is data, not a path to normalise.
    assert decode(b'{"type":"new_order","id":"../x"}').id == "../x"


def test_an_empty_type_is_called_empty_and_a_wrong_one_named() -> None:
    with pytest.raises(InvalidEvent) as empty:
        decode(b'{"type":"","id":"1"}')
    assert empty.value.detail == "'type' is an empty string"
    with pytest.raises(InvalidEvent) as number:
        decode(b'{"type":5,"id":"1"}')
    assert number.value.detail == "'type' must be a string, not int"
