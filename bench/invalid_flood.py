#!/usr/bin/env python3
"""How much a flood of invalid events slows the valid ones down, on this machine, on loopback.

For each run, a fresh ``<name>-queue`` is filled with N valid ``new_order`` events (distinct ids),
either alone or each preceded by R invalid bodies (``--ratio``, default 4: M = N x R invalid),
then drained by ``python -m svc``, with de-duplication off and on. The invalid bodies rotate
through every kind the decoder refuses (bad UTF-8, cut JSON, 50,000 open brackets, a JSON array,
no type, no id, an empty id, an object id, a lone-surrogate id, a 257-character id), so each
one is dead-lettered through a confirmed publish to ``<name>-dlq``; after the run the benchmark
checks that the dead-letter queue holds exactly M messages.

The drain is timed as in ``bench/throughput.py`` (whose environment and helpers this reuses:
its own vhost, its own etcd with fsync, a statsd UDP listener): from svc's ``consuming from``
line until its ``new_order`` counters reach N. Since the invalid bodies come before each valid
one, the last valid count arrives after every invalid body was dead-lettered. Printed:

- valid events/s, alone and in the flood (median and min-max of ``--runs`` interleaved runs);
- the slowdown: valid events/s alone divided by valid events/s in the flood;
- the cost of one invalid event: (median drain time in the flood - median alone) / M;
- that cost relative to a valid event's, k: the slowdown is 1 + R x k.

    python bench/invalid_flood.py                    # 10,000 valid, 4 invalid per valid, 3 runs
    python bench/invalid_flood.py --valid 20000 --ratio 10
    python bench/invalid_flood.py --smoke            # a miniature run, for CI
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pika
import pika.exceptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp

INVALID_BODIES = [
    b"\xff\xfe\xfd not utf-8",
    b'{"type":"new_order","id":"cut',
    b"[" * 50_000,
    b"[1, 2, 3]",
    b'{"id":"no-type"}',
    b'{"type":"new_order"}',
    b'{"type":"new_order","id":""}',
    b'{"type":"new_order","id":{"$ne":null}}',
    b'{"type":"new_order","id":"\\ud800"}',
    json.dumps({"type": "new_order", "id": "i" * 257}).encode(),
]
CONFIGS = [
    ("off-alone", False, False),
    ("off-flood", False, True),
    ("on-alone", True, False),
    ("on-flood", True, True),
]


def workload(valid: int, ratio: int, flood: bool, seed: str) -> list[bytes]:
    """N valid events with distinct ids, each preceded by ``ratio`` invalid bodies if ``flood``."""
    bodies: list[bytes] = []
    rotation = 0
    for n in range(valid):
        if flood:
            for _ in range(ratio):
                bodies.append(INVALID_BODIES[rotation % len(INVALID_BODIES)])
                rotation += 1
        bodies.append(json.dumps({"type": "new_order", "id": f"{seed}-{n}"}).encode())
    return bodies


def measure(
    ctx: tp.Context, config: str, dedup: bool, bodies: Sequence[bytes], valid: int
) -> tp.Sample:
    name = ctx.fresh_name(config)
    ctx.admin.prepare(name)
    try:
        tp.publish_confirmed(ctx.vhost.url(), bodies)
        sample = tp.run_svc(ctx, config, name, valid, dedup=dedup)
        invalid = len(bodies) - valid
        dead = ctx.admin.ready(f"{name}-dlq")
        if dead != invalid:
            raise tp.BenchError(f"{config}: {dead} dead letters for {invalid} invalid bodies")
        if ctx.vhost.queue_depth(f"{name}-queue") != (0, 0):
            raise tp.BenchError(f"{config}: {name}-queue not empty after the drain")
    finally:
        ctx.admin.delete(name)
    sample.extra["invalid"] = invalid
    ctx.samples.append({"mode": "invalid-flood", **asdict(sample)})
    return sample


def report(args: argparse.Namespace, results: dict[str, list[tp.Sample]]) -> None:
    invalid = args.valid * args.ratio
    tp.say(
        f"\ninvalid flood: {args.valid:,} valid events alone, then each after {args.ratio} "
        f"invalid ones ({invalid:,}); median (min-max) of the runs"
    )
    rows = []
    for config, _dedup, _flood in CONFIGS:
        samples = results[config]
        rows.append(
            [
                config,
                str(len(samples)),
                tp.median_spread([s.rate for s in samples]),
                tp.median_spread([s.seconds for s in samples], "{:.2f}"),
                tp.median_spread([s.cpu_s for s in samples], "{:.1f}"),
            ]
        )
    tp.print_table(["config", "runs", "valid events/s", "drain s", "cpu s"], rows)
    tp.say()
    factor_rows = []
    for dedup in ("off", "on"):
        alone, flood = results[f"{dedup}-alone"], results[f"{dedup}-flood"]
        if not alone or not flood:
            continue
        alone_s = tp.median([s.seconds for s in alone]) or 0.0
        flood_s = tp.median([s.seconds for s in flood]) or 0.0
        slowdown = flood_s / alone_s if alone_s else float("nan")
        per_invalid_us = (flood_s - alone_s) / invalid * 1e6
        per_valid_us = alone_s / args.valid * 1e6
        factor_rows.append(
            [
                f"dedup-{dedup}",
                f"{slowdown:.2f}",
                f"{per_invalid_us:.0f}",
                f"{per_valid_us:.0f}",
                f"{per_invalid_us / per_valid_us:.2f}",
            ]
        )
    tp.print_table(
        ["factor", "slowdown", "us per invalid", "us per valid", "k = invalid/valid"], factor_rows
    )
    tp.say(f"(slowdown = 1 + {args.ratio} x k: each invalid event costs k valid ones)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valid", type=int, default=10_000, help="valid events per run")
    parser.add_argument("--ratio", type=int, default=4, help="invalid bodies per valid event")
    parser.add_argument("--runs", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--prefetch", type=int, default=100, help="svc's PREFETCH")
    parser.add_argument("--json-out", type=Path, help="write every sample to this JSON file")
    parser.add_argument("--keep-logs", type=Path, help="copy the daemons' logs here")
    parser.add_argument("--smoke", action="store_true", help="a miniature run, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.valid, args.ratio, args.runs = 200, 3, 1
    if min(args.valid, args.ratio, args.runs, args.prefetch) < 1:
        parser.error("--valid, --ratio, --runs and --prefetch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    snapshot = Path(tempfile.mkdtemp(prefix="svc-bench-src-"))
    try:
        tp.SOURCE_ROOT = tp.snapshot_svc(snapshot)
        tp.say(
            f"invalid-flood benchmark: python {platform.python_version()}, pika "
            f"{pika.__version__}, load average {tp.loadavg()}; svc copied from "
            f"{tp.svc_version(tp.SOURCE_ROOT)}"
        )
        results: dict[str, list[tp.Sample]] = {config: [] for config, _, _ in CONFIGS}
        with tp.environment(args) as ctx:
            for round_number in range(args.runs):
                tp.say(f" round {round_number + 1}/{args.runs}")
                for config, dedup, flood in CONFIGS:
                    bodies = workload(args.valid, args.ratio, flood, f"r{round_number}")
                    sample = measure(ctx, config, dedup, bodies, args.valid)
                    tp.say(
                        f"  {config}: {sample.rate:,.0f} valid events/s ({sample.seconds:.2f} s)"
                    )
                    results[config].append(sample)
            report(args, results)
            if args.json_out:
                args.json_out.write_text(json.dumps(ctx.samples, indent=1))
    except (tp.BenchError, pika.exceptions.AMQPError, OSError) as error:
        tp.say(f"FAILED: {error}")
        return 1
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
    tp.say(f"\nfinished in {time.monotonic() - started:.0f} s; load average {tp.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
