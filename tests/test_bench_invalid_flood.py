"""``bench/invalid_flood.py --smoke`` drains a miniature flood and prints every row and factor.

Only that it works is checked: each configuration gets a positive rate, each de-duplication
setting a factor, and every invalid body ended in the dead-letter queue (the benchmark fails a
run otherwise). The figures are not asserted; the machine is shared and timings are noise here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

pytestmark = [pytest.mark.rabbit, pytest.mark.etcd]


def test_smoke_prints_rates_and_factors_with_every_invalid_body_dead_lettered(
    tmp_path: Path,
) -> None:
    samples_path = tmp_path / "samples.json"
    done = subprocess.run(
        [sys.executable, "bench/invalid_flood.py", "--smoke", "--json-out", str(samples_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}; output:\n{output[-6000:]}"

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
