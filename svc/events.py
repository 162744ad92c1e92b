"""The event and its decoder.

``decode`` either returns an :class:`Event` whose ``id`` and ``type`` are usable, or raises
:class:`InvalidEvent` whose code says why; it never lets a malformed body through with an empty
id (the original treated a missing id as ``""``, making every later id-less event a duplicate).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from svc.errors import PermanentError

MAX_BODY_BYTES = 1024 * 1024
MAX_ID_CHARS = 256


class InvalidEvent(PermanentError):
    """The body is not a usable event; it goes to the dead-letter queue with ``code``."""


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: str
    args: Any = None


def decode(body: bytes) -> Event:
    """Decode one delivery body, or raise InvalidEvent saying what is wrong with it."""
    if len(body) > MAX_BODY_BYTES:
        raise InvalidEvent("too-large", f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        document = _parse(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers too long to convert.
        raise InvalidEvent("invalid-json", _first_line(exc)) from None
    if not isinstance(document, dict):
        raise InvalidEvent("not-an-object", f"JSON {type(document).__name__} instead of object")

    named = [(k, v) for k, v in document.items() if k.lower() in _FIELDS]
    fields = _fold_keys(named)
    if len(fields) < len(named):
        # Two spellings of one field, such as "ID" and "id": Go's decoder takes the one that
        # comes last in the text, which a dict does not tell (a repeated key keeps its first
        # position), so {"ID":1,"id":2,"ID":3} would yield 2 where Go yields 3. Rare: read the
        # pairs in the order of the text.
        fields = _fold_keys(_outer_pairs(body))
    if "type" not in fields:
        raise InvalidEvent("missing-type", "no 'type' key")
    event_type = fields["type"]
    if not isinstance(event_type, str):
        raise InvalidEvent("bad-type", f"'type' must be a string, not {_kind(event_type)}")
    if not event_type:
        raise InvalidEvent("bad-type", "'type' is an empty string")
    if not _is_encodable(event_type):
        raise InvalidEvent("bad-type", "'type' holds a lone surrogate, not valid Unicode")
    if "id" not in fields:
        raise InvalidEvent("missing-id", "no 'id' key")
    return Event(id=_usable_id(fields["id"]), type=event_type, args=fields.get("args"))


_FIELDS = ("id", "type", "args")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("a number too large for a 64-bit float")
    return value


# Note: Python's decoder takes NaN, Infinity and -Infinity, which JSON (RFC 8259) and Go's
# decoder refuse, and turns 1e999 into infinity where Go refuses it; this one refuses them
# all. Built once: json.loads with an option builds a decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _parse(body: bytes) -> Any:
    """json.loads(body), refusing NaN, the infinities and numbers beyond a float's range."""
    return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))


def _outer_pairs(body: bytes) -> list[tuple[str, Any]]:
    """The pairs of the outermost object of a body known to parse, in the order of the text."""
    # The outermost object is the last one the parser finishes.
    outer_pairs: list[tuple[str, Any]] = []

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        outer_pairs[:] = pairs
        return dict(pairs)

    json.loads(
        body,
        object_pairs_hook=keep_pairs,
        parse_constant=_refuse_constant,
        parse_float=_finite_float,
    )
    return outer_pairs


def _fold_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Pick id/type/args whatever their case; a later key in the text wins, as in Go's decoder."""
    return {k.lower(): v for k, v in pairs if k.lower() in _FIELDS}


def _usable_id(value: Any) -> str:
    # bool is a subclass of int, but `true` is not an id.
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidEvent("bad-id", f"'id' must be a string or an integer, not {_kind(value)}")
    if not text:
        raise InvalidEvent("empty-id", "'id' is an empty string")
    if not _is_encodable(text):
        raise InvalidEvent("bad-id", "'id' holds a lone surrogate, not valid Unicode")
    if len(text) > MAX_ID_CHARS:
        raise InvalidEvent("id-too-long", f"'id' has {len(text)} characters, max {MAX_ID_CHARS}")
    return text


def _is_encodable(text: str) -> bool:
    # JSON escapes such as "\\ud800" decode to strings that cannot become etcd keys or log lines.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
