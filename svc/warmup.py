"""Reading every key under a prefix from etcd in pages, fast whatever the keys look like.

Why not just page through the prefix: etcd 3.5 walks every key left in a request's range to
count them, even for a page of ``limit`` keys (https://etcd.io/docs/v3.5/learning/api/#range).
Paging through a million keys as one range walks the rest of the range for every page, about
fifty million steps. Reading sub-ranges of at most a page each walks every key about once.

Where to cut: at the bytes where the keys actually differ. After the first page, the keys still
to read lie in the spans that branch off the path to the page's last key, below the byte where
the page's first and last keys part (above it, every key would share their prefix). One
transaction of count-only ranges tells how many keys each span holds; spans that hold at most a
page together are read as one range, and a crowded span is counted again one byte deeper. With
ids ``id-0000001``, ``id-0000002``, ... the cut falls at the digits, with random ids at the first
byte: either way about three walks of each key, and a few dozen requests per million keys.

Counts and reads name the revision of the first page, so they see one snapshot; a wrong count
(there is none at one revision) would only cost speed, since every read pages until its end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

PAGE_KEYS = 10_000
READERS = 4


class KeyValue(Protocol):
    key: bytes


class Page(Protocol):
    """What a range read returns (etcd's RangeResponse has this shape)."""

    @property
    def kvs(self) -> Sequence[KeyValue]: ...
    @property
    def more(self) -> bool: ...


#: Reads at most PAGE_KEYS keys of [low, high), loading them, and returns the page.
ReadPage = Callable[[bytes, bytes], Page]
#: How many keys each [low, high) holds, in one round trip per batch of ranges.
CountKeys = Callable[[Sequence[tuple[bytes, bytes]]], list[int]]


@dataclass(frozen=True, slots=True)
class Span:
    """The keys in [low, high), all starting with ``stem`` (low may lie past ``stem`` itself)."""

    low: bytes
    high: bytes
    stem: bytes


@dataclass(frozen=True, slots=True)
class _Read:
    low: bytes
    high: bytes


@dataclass(frozen=True, slots=True)
class _Split:
    """Count a crowded span's keys by their next byte, then plan again."""

    span: Span


@dataclass(frozen=True, slots=True)
class _Descend:
    """Read a crowded span's first page, then cut where its keys differ."""

    span: Span


_Task = _Read | _Split | _Descend


def prefix_end(stem: bytes) -> bytes:
    """The smallest key above every key that starts with ``stem`` (etcd's prefix range end)."""
    trimmed = stem.rstrip(b"\xff")
    if not trimmed:
        return b"\0"  # every key from stem on
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def read_rest(
    stem: bytes,
    first: Page,
    read_page: ReadPage,
    count: CountKeys,
    readers: int = READERS,
) -> None:
    """Read every key under ``stem`` after ``first``, the page that started at ``stem``.

    Up to ``readers`` requests run at once, so etcd's cores share the work.
    """
    if not first.more:
        return
    planner = _Planner(read_page, count)
    tasks = planner.after_page(stem, first)
    with ThreadPoolExecutor(readers, thread_name_prefix="warm-up") as pool:
        running: set[Future[list[_Task]]] = {pool.submit(planner.run, t) for t in tasks}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                # A failed read raises here; the pool then finishes what is running and stops.
                running |= {pool.submit(planner.run, t) for t in future.result()}


class _Planner:
    def __init__(self, read_page: ReadPage, count: CountKeys) -> None:
        self._read_page = read_page
        self._count = count

    def run(self, task: _Task) -> list[_Task]:
        if isinstance(task, _Read):
            page = self._read_page(task.low, task.high)
            while page.more and page.kvs:
                page = self._read_page(page.kvs[-1].key + b"\0", task.high)
            return []
        if isinstance(task, _Descend):
            page = self._read_page(task.span.low, task.span.high)
            return self.after_page(task.span.stem, page)
        spans = by_next_byte(task.span)
        counts = self._count([(s.low, s.high) for s in spans])
        crowded = [(s, n) for s, n in zip(spans, counts, strict=True) if n]
        if len(crowded) == 1 and crowded[0][1] > PAGE_KEYS:
            # Every key shares the next byte too: counting deeper byte by byte could take as
            # many walks as the ids are long; a page tells at once where the keys part.
            return [_Descend(crowded[0][0])]
        return plan(spans, counts)

    def after_page(self, stem: bytes, page: Page) -> list[_Task]:
        if not page.more or not page.kvs:
            return []
        spans = spans_after(stem, page.kvs[0].key, page.kvs[-1].key)
        return plan(spans, self._count([(s.low, s.high) for s in spans]))


def spans_after(stem: bytes, first: bytes, last: bytes) -> list[Span]:
    """The spans, in key order, that hold every key under ``stem`` after ``last``.

    ``first`` and ``last`` are a page's first and last keys. Keys after ``last`` either share
    ``last``'s prefix up to and including the byte where ``first`` and ``last`` part (one span),
    or branch off that path at a higher byte (one span per level and byte value).
    """
    shared = _common_prefix_length(first, last)
    part = min(shared, len(last) - 1)  # the byte where first and last part
    spans = [Span(last + b"\0", prefix_end(last[: part + 1]), last[: part + 1])]
    for level in range(part, len(stem) - 1, -1):
        for byte in range(last[level] + 1, 256):
            branch = last[:level] + bytes([byte])
            spans.append(Span(branch, prefix_end(branch), branch))
    return spans


def by_next_byte(span: Span) -> list[Span]:
    """``span`` cut into one span per value of the byte after its stem, in key order.

    Every piece keeps the invariant that its keys start with its stem: a key equal to the stem
    itself (an id that is the beginning of others) gets a piece of its own, ahead of the rest.
    """
    depth = len(span.stem)
    low = max(span.low, span.stem)  # no key of the span lies before its stem
    if not low.startswith(span.stem):
        return []  # low lies past every key that starts with the stem: the span is empty
    spans = []
    if low == span.stem:
        spans.append(Span(low, span.stem + b"\x00", span.stem))
        first_byte = 0
    else:
        first_byte = low[depth]
    for byte in range(first_byte, 256):
        branch = span.stem + bytes([byte])
        piece_low = low if byte == first_byte and low != span.stem else branch
        spans.append(Span(piece_low, prefix_end(branch), branch))
    return spans


def plan(spans: Sequence[Span], counts: Sequence[int]) -> list[_Task]:
    """Reads of neighbouring spans that together hold at most a page; crowded spans split."""
    tasks: list[_Task] = []
    group: list[Span] = []
    held = 0

    def close_group() -> None:
        nonlocal held
        if group:
            tasks.append(_Read(group[0].low, group[-1].high))
            group.clear()
            held = 0

    for span, keys in zip(spans, counts, strict=True):
        if not keys:
            continue
        if keys > PAGE_KEYS:
            close_group()
            tasks.append(_Split(span))
            continue
        if held + keys > PAGE_KEYS:
            close_group()
        group.append(span)
        held += keys
    close_group()
    return tasks


def _common_prefix_length(a: bytes, b: bytes) -> int:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))
