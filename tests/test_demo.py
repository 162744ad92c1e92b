"""``python -m svc.demo`` plays the talk's three scenarios and passes each of them.

The demo runs as the README runs it, but in a vhost of its own, against the session's etcd and
with statsd forwarding off; the test reads its exit status, verdicts and printed counters.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, EtcdServer, base_environment

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

DEMO_TIMEOUT_SECONDS = 150
_COUNTS = re.compile(r"(\w+) ok=(\d+)(?: \(\+\d+\))? skipped=(\d+)")


def run_demo(*args: str) -> tuple[int, str]:
    """Run the demo to its end; on overrun, SIGTERM it so it stops what it started."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "svc.demo", *args],
        cwd=REPO_ROOT,
        env=base_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        output, _ = demo.communicate(timeout=DEMO_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        demo.terminate()
        output, _ = demo.communicate(timeout=60)
        pytest.fail(f"the demo ran over {DEMO_TIMEOUT_SECONDS} s; output:\n{output}")
    return demo.returncode, output


def scenario_lines(output: str, number: int) -> list[str]:
    section = output.split(f"== Scenario {number}.", 1)[1]
    return section.split("== Scenario", 1)[0].splitlines()


def counters(line: str) -> dict[str, tuple[int, int]]:
    """``{"orders": (ok, skipped), ...}`` from one printed counters line."""
    return {name: (int(ok), int(skipped)) for name, ok, skipped in _COUNTS.findall(line)}


@pytest.mark.timeout(DEMO_TIMEOUT_SECONDS + 30)
def test_demo_passes_every_scenario_of_the_talk(
    vhost: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    status, output = run_demo(
        "--rabbit-url", vhost,
        "--etcd-endpoints", etcd_server.endpoint,
        "--no-forward",
        "--log-dir", str(tmp_path),
    )  # fmt: skip

    assert status == 0, output
    verdicts = [line for line in output.splitlines() if line.startswith(("PASS:", "FAIL:"))]
    assert len(verdicts) == 3, output
    assert all(line.startswith("PASS:") for line in verdicts), output
    # Scenario 3, step by step: the duplicate handled twice without etcd; with etcd a fresh id
    # handled once, then skipped, and skipped again after a restart. Totals since the demo began.
    printed = [counters(line) for line in scenario_lines(output, 3) if "counters:" in line]
    expected = [(4, 0), (4, 0), (5, 0), (5, 1), (5, 1), (5, 2)]
    assert printed == [{"orders": pair, "notify": pair} for pair in expected], output
    assert "without etcd the duplicate was processed twice" in output
