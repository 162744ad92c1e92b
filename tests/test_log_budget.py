"""The cap on per-event log lines (pure logic, with a fake clock)."""

from __future__ import annotations

import logging

import pytest

from svc.log_budget import LineBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_past_the_cap_are_left_out_and_reported_once_the_second_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    budget = LineBudget(3, clock)
    caplog.set_level(logging.INFO)
    assert [budget.allow() for _ in range(5)] == [True, True, True, False, False]
    assert "left out" not in caplog.text  # said only when the second is over
    clock.now += 1.0
    budget.tick()
    assert "2 event lines left out in the last 1.0 s (over LOG_EVENTS_PER_SECOND=3)" in caplog.text
    assert [budget.allow() for _ in range(3)] == [True, True, True]


def test_a_quiet_second_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    budget = LineBudget(3, clock)
    caplog.set_level(logging.INFO)
    budget.allow()
    clock.now += 5
    budget.tick()
    assert caplog.text == ""


def test_zero_allows_every_line() -> None:
    budget = LineBudget(0, FakeClock())
    assert all(budget.allow() for _ in range(10_000))
