"""Capped, jittered exponential backoff for reconnects and store retries."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``first_seconds`` up to ``cap_seconds``, with jitter.

    Jitter keeps replicas that lost the same broker or etcd from retrying in lock-step.
    Call :meth:`reset` once the guarded operation works again.
    """

    def __init__(self, first_seconds: float = 0.5, cap_seconds: float = 15.0) -> None:
        self.first_seconds = first_seconds
        self.cap_seconds = cap_seconds
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_seconds, self.first_seconds * 2**self.attempt)
        self.attempt += 1
        # Never less than half the ceiling, so a retry storm cannot degenerate into a tight loop.
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
