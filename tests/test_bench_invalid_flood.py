"""``bench/invalid_flood.py --smoke`` drains a miniature flood and prints every row and factor.

Only that it works is checked: each configuration gets a positive rate, each de-duplication
setting a factor, and every invalid body ended in the dead-letter queue (the benchmark fails a
run otherwise). The figures are not asserted; the machine is shared and timings are noise here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import run_bench_smoke

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]


def test_smoke_prints_rates_and_factors_with_every_invalid_body_dead_lettered(
    tmp_path: Path,
) -> None:
    samples_path = tmp_path / "samples.json"
    output = run_bench_smoke("invalid_flood.py", samples_path, timeout=180)

    for config in ("off-alone", "off-flood", "on-alone", "on-flood"):
        row = re.search(rf"(?m)^{config} +1 +([\d,]+) ", output)
        assert row and float(row[1].replace(",", "")) > 0, f"{config}:\n{output}"
    for dedup in ("off", "on"):
        factor = re.search(rf"(?m)^dedup-{dedup} +([\d.]+) +(-?\d+) +(\d+) +(-?[\d.]+)$", output)
        assert factor and float(factor[1]) > 0, f"dedup-{dedup}:\n{output}"

    samples = json.loads(samples_path.read_text())
    assert sorted(s["config"] for s in samples) == [
        "off-alone",
        "off-flood",
        "on-alone",
        "on-flood",
    ]
    assert {s["config"]: s["extra"]["invalid"] for s in samples} == {
        "off-alone": 0,
        "off-flood": 600,
        "on-alone": 0,
        "on-flood": 600,
    }
