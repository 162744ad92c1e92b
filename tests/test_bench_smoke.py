"""``bench/throughput.py --smoke`` runs every benchmark mode in miniature and prints its tables.

Only that it works is checked: each configuration gets a row with a positive figure, and its
CPU per event (consumer, etcd, broker) adds up. The figures themselves are not asserted; the
machine is shared and timings are noise here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import run_bench_smoke

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]

# Rows of the throughput and replicas tables: "<config>  <runs>  <events/s> ...".
RATE_ROWS = {
    "ref-multi": 2,  # once per workload: distinct ids, then repeated ids
    "ref-each": 1,
    "ref-noack": 1,
    "svc-off": 2,
    "svc-on": 2,
    "svc-on-logs": 1,
    "replicas-1": 1,
    "replicas-2": 1,
}


def test_smoke_prints_a_positive_row_for_every_configuration(tmp_path: Path) -> None:
    samples_path = tmp_path / "samples.json"
    output = run_bench_smoke("throughput.py", samples_path, timeout=240)

    for config, expected in RATE_ROWS.items():
        rates = [
            float(match[1].replace(",", ""))
            for match in re.finditer(rf"(?m)^{re.escape(config)} +[1-9]\d* +([\d,.]+)", output)
        ]
        assert len(rates) == expected, f"{config}: {len(rates)} rows, not {expected}:\n{output}"
        assert all(rate > 0 for rate in rates), f"{config}: {rates}\n{output}"

    # What limits a configuration: its CPU per event, split into the consumer, etcd and the
    # broker, and the rate at which that total fills the machine's cores.
    for config in ("ref-multi", "svc-on", "replicas-2"):
        budget = re.search(
            rf"(?m)^{config} .* (\d+) \+ (\d+) \+ (\d+) = (\d+) +([\d,]+) ev/s", output
        )
        assert budget, f"{config}: no CPU budget\n{output}"
        own, etcd, broker, total = (int(budget[i]) for i in range(1, 5))
        assert own > 0 and broker > 0 and abs(own + etcd + broker - total) <= 2, budget[0]
        assert (etcd > 0) == (config != "ref-multi"), budget[0]

    latency = re.search(r"(?m)^latency-on +[1-9]\d* +([\d.]+)", output)
    assert latency and float(latency[1]) > 0, output
    for shape in ("sequential", "random"):
        startup = re.search(rf"(?m)^startup-{shape} +[1-9]\d* +[\d,]+ +([\d.]+)", output)
        assert startup and float(startup[1]) > 0, output

    samples = json.loads(samples_path.read_text())
    assert {s["mode"] for s in samples} >= {
        "throughput-distinct",
        "throughput-repeats",
        "latency",
        "startup",
        "replicas",
    }
