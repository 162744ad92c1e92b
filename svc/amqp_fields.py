"""AMQP field tables from untrusted publishers: decoded without failing, re-sent only if valid.

A publisher chooses a message's headers, and RabbitMQ passes a header table through as it was
sent. pika decodes it inside its I/O loop, before any of our code sees the delivery, and a
value it cannot convert raises there: the connection drops, the broker requeues the message,
the next connection receives it again, and the queue never moves past it. The guarantee kept
here: a header value never breaks the connection; one pika cannot convert is kept as the plain
number it carried, and :func:`encodable_headers` says whether a table can be sent on as it is.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import pika.data
import pika.exceptions

log = logging.getLogger(__name__)

_pika_decode_value = pika.data.decode_value


def decode_value_safely(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's ``decode_value``, except that a value it cannot convert is returned as a number.

    Note: pika turns a ``T`` (timestamp) field into a datetime, which raises for any value past
    the year 9999, and a ``d``/``f`` (double/float) field into an int, which raises for NaN and
    infinities. https://github.com/pika/pika/blob/main/pika/data.py (``decode_value``)
    """
    try:
        return _pika_decode_value(encoded, offset)
    except (OverflowError, ValueError, OSError):
        kind = encoded[offset : offset + 1]
        if kind == b"T":
            return struct.unpack_from(">Q", encoded, offset + 1)[0], offset + 9
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        raise


def install() -> None:
    """Make pika decode every header table with :func:`decode_value_safely`.

    pika looks ``decode_value`` up in its module at each call, nested tables and arrays
    included, so replacing the module attribute covers every level. Idempotent.
    """
    pika.data.decode_value = decode_value_safely


def encodable_headers(headers: dict[str, Any]) -> bool:
    """Whether pika can encode ``headers``; encoding fails midway through a publish otherwise.

    A value kept as a plain number by :func:`decode_value_safely` may not fit any AMQP integer
    type (a timestamp of 2**64 - 1 seconds does not fit a signed 64-bit field).
    """
    try:
        pika.data.encode_table([], headers)
    except (struct.error, pika.exceptions.UnsupportedAMQPFieldException, ValueError) as exc:
        log.debug("headers cannot be re-encoded: %r", exc)
        return False
    return True
