"""How the warm-up cuts a prefix into ranges (svc/warmup.py), against an in-memory sorted store.

The store fakes etcd's range semantics (sorted keys, limit, ``more``) and tallies what etcd
would walk: every key left in a request's range, page or count alike. Every key must be read
exactly once, none outside the prefix, and the walk must stay near a few passes over the keys
whatever the ids look like (one range paged through would walk about N * N / page keys).
"""

from __future__ import annotations

import bisect
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from svc import warmup

PREFIX = b"/service/orders/"


@dataclass
class FakeKV:
    key: bytes


@dataclass
class FakePage:
    kvs: list[FakeKV]
    more: bool


class SortedStore:
    def __init__(self, keys: Sequence[bytes]) -> None:
        self.keys = sorted(keys)
        self.read: list[bytes] = []
        self.walked = 0
        self.requests = 0
        self._lock = threading.Lock()

    def _span(self, low: bytes, high: bytes) -> tuple[int, int]:
        start = bisect.bisect_left(self.keys, low)
        end = bisect.bisect_left(self.keys, high) if high != b"\0" else len(self.keys)
        return start, end

    def read_page(self, low: bytes, high: bytes) -> FakePage:
        start, end = self._span(low, high)
        taken = self.keys[start : min(end, start + warmup.PAGE_KEYS)]
        with self._lock:
            self.requests += 1
            self.walked += end - start
            self.read.extend(taken)
        return FakePage([FakeKV(k) for k in taken], more=end - start > len(taken))

    def count(self, ranges: Sequence[tuple[bytes, bytes]]) -> list[int]:
        counts = [end - start for start, end in (self._span(lo, hi) for lo, hi in ranges)]
        with self._lock:
            self.requests += -(-len(ranges) // 128)
            self.walked += sum(counts)
        return counts

    def warm_up(self) -> None:
        first = self.read_page(PREFIX, warmup.prefix_end(PREFIX))
        warmup.read_rest(PREFIX, first, self.read_page, self.count)


def ids_of(shape: str, n: int) -> list[str]:
    rnd = random.Random(3)
    if shape == "sequential":
        return [f"preloaded-{i:09d}" for i in range(n)]
    if shape == "random":
        return [f"{rnd.getrandbits(128):032x}" for _ in range(n)]
    if shape == "uuid-like with a shared head":
        return [f"2026-12-04/{rnd.getrandbits(64):016x}" for _ in range(n)]
    if shape == "mixed":
        # prefixes of one another, bytes 0x00 and 0xff, non-ASCII, one crowded family
        odd = ["", "a", "a\x00", "a\x00\x00", "a\xff", "\xff", "\xff\xff", "é", "zz"]
        return odd + [f"x{i}" for i in range(n // 2)] + [f"y-{i:07d}-é" for i in range(n // 2)]
    raise AssertionError(shape)


@pytest.mark.parametrize("shape", ["sequential", "random", "uuid-like with a shared head", "mixed"])
def test_every_key_under_the_prefix_is_read_once_and_nothing_else(shape: str) -> None:
    ids = ids_of(shape, 300_000)
    keys = [PREFIX + i.encode("utf-8", "surrogateescape") for i in ids]
    outside = [b"/service/orders", b"/service/orders0", b"/service/ordersx/1", b"/service/p/1"]
    store = SortedStore(keys + outside)
    store.warm_up()
    assert sorted(store.read) == sorted(keys)
    assert len(store.read) == len(set(store.read))
    # A few passes; one range paged through would walk about 15 passes of these 300,000 keys.
    assert store.walked <= 6 * len(keys), store.walked
    assert store.requests <= 200, store.requests


def test_a_prefix_of_one_page_takes_one_request() -> None:
    store = SortedStore([PREFIX + f"{i}".encode() for i in range(warmup.PAGE_KEYS)])
    store.warm_up()
    assert len(store.read) == warmup.PAGE_KEYS
    assert store.requests == 1


def test_a_failed_read_is_raised() -> None:
    store = SortedStore([PREFIX + f"{i:06d}".encode() for i in range(50_000)])

    def failing(low: bytes, high: bytes) -> FakePage:
        raise TimeoutError("etcd did not answer")

    first = store.read_page(PREFIX, warmup.prefix_end(PREFIX))
    with pytest.raises(TimeoutError):
        warmup.read_rest(PREFIX, first, failing, store.count)


def odd_keys(rng: random.Random) -> list[bytes]:
    """Up to 120 keys over a tiny alphabet (0x00, 0xff...), many the beginning of another."""
    alphabet = rng.choice([b"\x00\xff", b"\x00\x01\xfe\xff", b"ab", bytes(range(256))])
    head = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    keys: set[bytes] = set()
    for _ in range(rng.randint(1, 120)):
        pick = rng.random()
        if pick < 0.3 and keys:
            key = rng.choice(sorted(keys))
            key = key[: rng.randint(len(PREFIX), len(key))]  # the beginning of another key
        elif pick < 0.6 and keys:
            key = rng.choice(sorted(keys)) + bytes(rng.choice(alphabet) for _ in range(3))
        else:
            tail = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
            key = PREFIX + head[: rng.randint(0, len(head))] + tail
        keys.add(key)
    return sorted(keys)


def test_odd_ids_with_tiny_pages_are_each_read_exactly_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tiny pages make every id shape crowded, so each way of cutting a range gets exercised.
    for seed in range(1500):
        rng = random.Random(seed)
        monkeypatch.setattr(warmup, "PAGE_KEYS", rng.randint(1, 8))
        keys = odd_keys(rng)
        store = SortedStore([*keys, b"/service/orders", b"/service/orders0", b"/service/p/1"])
        first = store.read_page(PREFIX, warmup.prefix_end(PREFIX))
        warmup.read_rest(PREFIX, first, store.read_page, store.count, readers=rng.randint(1, 4))
        assert sorted(store.read) == keys, f"seed {seed}: read {len(store.read)} of {len(keys)}"
