"""bench/chaos.py in a reduced mode: kills, a connection cut and an etcd restart cost nothing
but the in-flight window.

The script is run as a user would run it, as a subprocess, and its printed table is the
evidence: ``lost`` must be 0 and ``handled twice`` at most ``bound`` (the claims the killed
replicas held when they died). Without kills nothing may be handled twice at all.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT, rabbitmqctl

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

CHAOS = REPO_ROOT / "bench" / "chaos.py"
ROW = re.compile(r"^(?P<name>[a-z][a-z ]*[a-z])\s{2,}(?P<value>\S.*)$")


def run_chaos(*args: str, timeout: float) -> tuple[int, dict[str, str], str]:
    """Run bench/chaos.py; return its exit status, its table as a dict, and all its output."""
    done = subprocess.run(
        [sys.executable, str(CHAOS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,
    )
    table = {}
    for line in done.stdout.splitlines():
        match = ROW.match(line)
        if match:
            table[match["name"]] = match["value"]
    return done.returncode, table, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"


def number(table: dict[str, str], name: str) -> int:
    return int(table[name].split()[0])


def assert_vhost_removed(output: str) -> None:
    """The vhost the script says it used no longer exists."""
    named = re.search(r"\bvhost (chaos-[0-9a-f]+)", output)
    assert named, f"the script did not name its vhost:\n{output}"
    assert named[1] not in rabbitmqctl("list_vhosts", "--quiet").split(), "vhost left behind"


@pytest.mark.timeout(240)
def test_kills_a_cut_and_an_etcd_restart_lose_nothing_and_repeat_at_most_the_claims_held() -> None:
    """Failure: two replicas under a steady stream are SIGKILLed three times, their broker
    connections are closed once and etcd is killed and restarted once.

    Recovery expected: every distinct id is handled; handled twice stays within the claims the
    killed replicas held at their death; the script exits 0 and leaves no vhost behind.
    """
    status, table, output = run_chaos(
        "--replicas", "2",
        "--events", "5000",
        "--repeat-rate", "0.3",
        "--kills", "3",
        "--kill-every", "4",
        "--rate", "250",
        "--prefetch", "50",
        "--drain-timeout", "90",
        "--seed", "2021",
        timeout=220,
    )  # fmt: skip
    assert {"lost", "handled twice", "bound", "kills"} <= set(table), output
    assert number(table, "kills") == 3, output
    assert number(table, "connection cuts") == 1, output
    assert number(table, "etcd restarts") == 1, output
    assert number(table, "published") == 5000, output
    assert number(table, "lost") == 0, output
    assert number(table, "handled twice") <= number(table, "bound"), output
    assert number(table, "bound") <= 3 * 50, output
    assert number(table, "handled") >= number(table, "distinct ids"), output
    assert status == 0, output
    assert_vhost_removed(output)


@pytest.mark.timeout(180)
def test_without_faults_no_event_is_handled_twice() -> None:
    """Failure: none; two replicas race for the same ids (30% of the events repeat one).

    Expected: each distinct id handled exactly once, nothing lost, exit status 0.
    """
    status, table, output = run_chaos(
        "--no-kill", "--replicas", "2", "--events", "5000", "--seed", "7", timeout=160
    )
    assert number(table, "kills") == 0, output
    assert number(table, "lost") == 0, output
    assert number(table, "handled twice") == 0, output
    assert number(table, "handled") == number(table, "distinct ids"), output
    assert status == 0, output
    assert_vhost_removed(output)
