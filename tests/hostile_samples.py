"""Hostile values shared by the hostile-input tests: ids, keys and numbers that have hurt parsers."""

from __future__ import annotations

import re

from hypothesis import strategies as st

from svc.events import MAX_ID_CHARS

#: The codes svc.events.InvalidEvent may carry: a dead letter's x-reason starts with one.
REFUSAL_CODES = {
    "too-large",
    "invalid-json",
    "not-an-object",
    "missing-type",
    "bad-type",
    "missing-id",
    "empty-id",
    "bad-id",
    "id-too-long",
}

# Every character, lone surrogates (\ud800-\udfff) included.
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=40)

NASTY_IDS = [
    "../x",
    "../../other-service/x",
    "/",
    "..",
    "/service/other/x",
    "\x00",
    "a\x00b",
    "\xff",
    "\ufeff",
    "\u2028",
    "\u202e",
    "new_order\nforged:1|c",
    "a:1|c",
    "e\u0301",  # NFD of "é"
    "\u00e9",  # NFC of "é"
    "\uff49\uff44",  # fullwidth "id"
    "\U0001f600",
    " ",
    "*",
    "%2F",
    "\ud800",
    "x" * MAX_ID_CHARS,
    "x" * (MAX_ID_CHARS + 1),
    "\U0001f600" * MAX_ID_CHARS,
]
NASTY_KEYS = ["id", "ID", "Id", "type", "TYPE", "tYpE", "args", "Args", "\u0130d", "\uff49\uff44"]
NASTY_NUMBERS = ["NaN", "-Infinity", "Infinity", "1e99999", "-0", "1" * 5000, "1" * 300, "1.5"]


def unescape_line(text: str) -> str:
    """Undo the escaping of an id in a TEST_HANDLED_LOG line (svc.faults.escape_line)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), text)
