"""The real metrics pipeline: svc -> statsd (npm) -> carbon -> graphite-web's render API.

A stack from ``svc.stack`` runs in a directory of its own on free loopback ports (statsd,
carbon, graphite-web), so neither a developer's ``scripts/stack`` nor old whisper files can
answer for it; metric names are unique per run as well. Needs Debian's graphite-carbon and
graphite-web and the npm statsd in .stack/: ``python -m svc.stack install`` (``.ci/run`` does it).
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from svc.stack import DEFAULT_HOME, Ports, Stack
from tests.support import (
    RABBIT_PORT,
    EtcdServer,
    Publisher,
    ServiceProcess,
    free_port,
    unique_name,
    wait_until,
)
from tests.test_demo import counters, run_demo, scenario_lines

pytestmark = [pytest.mark.graphite, pytest.mark.rabbit]

# statsd flushes every second; carbon's cache answers graphite-web at once. Once the expected
# totals are in, they must stay unchanged for longer than a flush: nothing more may come.
STABLE_SECONDS = 2.5


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = Ports(
        statsd=free_udp_port(),
        statsd_admin=free_port(),
        carbon=free_port(),
        carbon_pickle=free_port(),
        carbon_query=free_port(),
        web=free_port(),
        rabbit=RABBIT_PORT,
    )
    graphite_stack = Stack(tmp_path_factory.mktemp("stack"), ports, packages=DEFAULT_HOME)
    missing = graphite_stack.missing()
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `python -m svc.stack install` first")
    try:
        graphite_stack.start(etcd=False, rabbit=False)
        yield graphite_stack
    finally:
        graphite_stack.stop()


def render_totals(web_url: str, targets: list[str], since: float) -> dict[str, float]:
    """What a user reads from /render?format=json: each target's points summed (nulls skipped)."""
    query = [("target", target) for target in targets] + [
        ("from", str(int(since) - 1)),
        ("format", "json"),
    ]
    with urllib.request.urlopen(f"{web_url}/render?{urllib.parse.urlencode(query)}") as answer:
        series = json.load(answer)
    totals = dict.fromkeys(targets, 0.0)
    for one in series:
        totals[one["target"]] = sum(value for value, _ts in one["datapoints"] if value is not None)
    return totals


def wait_stable_totals(
    read: Callable[[], dict[str, float]], expected: dict[str, float], timeout: float
) -> dict[str, float]:
    """Wait for ``expected``, then watch for STABLE_SECONDS; return what was read last."""
    seen: list[dict[str, float]] = [{}]

    def arrived() -> bool:
        seen[0] = read()
        return seen[0] == expected

    try:
        wait_until(arrived, timeout, f"Graphite totals {expected}", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last read {seen[0]}") from None
    time.sleep(STABLE_SECONDS)
    return read()


@pytest.mark.etcd
def test_events_published_to_the_service_reach_graphite_with_the_right_totals(
    stack: Stack,
    run_service: Callable[..., ServiceProcess],
    publisher: Publisher,
    etcd_server: EtcdServer,
) -> None:
    name = unique_name("graphite").replace("-", "_")
    since = time.time()
    run_service(
        name,
        ENABLE_ETCD="true",
        ETCD_ENDPOINTS=etcd_server.endpoint,
        STATSD_PORT=str(stack.ports.statsd),
    )
    new_ids = [f"{name}-{n}" for n in range(7)]
    publisher.publish_orders([*new_ids, new_ids[0], new_ids[3], new_ids[0]])

    ok, skipped = f"stats_counts.{name}_new_order_ok", f"stats_counts.{name}_new_order_skipped"
    totals = wait_stable_totals(
        lambda: render_totals(stack.web_url, [ok, skipped], since),
        {ok: 7, skipped: 3},
        timeout=30,
    )
    assert totals == {ok: 7, skipped: 3}


@pytest.mark.etcd
@pytest.mark.timeout(240)
def test_demo_reads_its_counters_from_graphite(
    stack: Stack, vhost: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    status, output = run_demo(
        "--rabbit-url", vhost,
        "--etcd-endpoints", etcd_server.endpoint,
        "--statsd-forward", f"127.0.0.1:{stack.ports.statsd}",
        "--graphite", stack.web_url,
        "--log-dir", str(tmp_path),
    )  # fmt: skip

    assert status == 0, output
    assert f"counters read from Graphite ({stack.web_url}" in output, output
    verdicts = [line for line in output.splitlines() if line.startswith(("PASS:", "FAIL:"))]
    assert len(verdicts) == 3 and all(v.startswith("PASS:") for v in verdicts), output
    printed = [counters(line) for line in scenario_lines(output, 3) if "counters:" in line]
    expected = [(4, 0), (4, 0), (5, 0), (5, 1), (5, 1), (5, 2)]
    assert printed == [{"orders": pair, "notify": pair} for pair in expected], output
    # And Graphite itself, asked afresh, holds the demo's final totals.
    series = [
        f"stats_counts.{s}_new_order_{k}" for s in ("orders", "notify") for k in ("ok", "skipped")
    ]
    final = render_totals(stack.web_url, series, time.time() - 600)
    assert final == {
        "stats_counts.orders_new_order_ok": 5,
        "stats_counts.orders_new_order_skipped": 2,
        "stats_counts.notify_new_order_ok": 5,
        "stats_counts.notify_new_order_skipped": 2,
    }


def test_stop_ends_every_process_the_stack_started(stack: Stack) -> None:
    """Last in this module: the stack's own ``stop``, then nothing of it answers or runs."""
    names = ("statsd", "carbon", "graphite-web")
    pids = {name: stack.running_pid(name) for name in names}
    assert all(pids.values()), pids

    stack.stop()

    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still runs"
    assert not list(stack.pids.glob("*.pid"))
    status = stack.status()
    assert all(status[name].startswith("down") for name in names), status
