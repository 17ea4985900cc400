#!/usr/bin/env python3
"""Hardware-in-the-loop figures: decisions per second and round-trip times as the number of daemons grows.

Why: a HIL run is only as fast as its slowest controller answers, and every daemon, the broker and SUMO share
this machine's cores; the figures say how many controllers one machine can drive and at what latency.

For each fleet size n (default 1, 4, 8, 16): `reled-edge fleet up --hil` starts n daemon processes on the first
n lights of grid4x4 (16 lights) with a freshly exported grid4x4 policy, `reled hil run --speed max` drives them
for ``--episode-seconds`` of simulated time (the other lights run the plant's fixed-time plan), and
`reled-edge fleet down` stops them. Decisions/s counts the devices' answered decisions per wall second; the RTT
is from the plant's request to the device's answer (the worst device's p50 and p99). One run per size (the
plant's SUMO time is included: it is what a HIL user waits for).

    .venv/bin/python tools/bench/hil_bench.py                          # about 2 min
    .venv/bin/python tools/bench/hil_bench.py --sizes 1,4,8,16 --json docs/results/bench_hil.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_runtime.fileio import atomic_write_text

RELED = [sys.executable, "-m", "trainer"]
EDGE = [sys.executable, "-m", "edge_runtime"]
SCENARIO = "grid4x4"


def run(command: list[str], timeout: float = 900) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:5])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr}")


def measure(model: Path, size: int, root: Path, episode_seconds: float, deadline_ms: float) -> dict:
    fleet, out = root / f"fleet{size}", root / f"hil{size}"
    run([*EDGE, "fleet", "up", "--model", str(model), "--dir", str(fleet), "--devices", str(size), "--hil",
         "--no-collect"])
    try:
        run([*RELED, "hil", "run", "--scenario", SCENARIO, "--fleet", str(fleet), "--speed", "max",
             "--episode-seconds", str(episode_seconds), "--deadline-ms", str(deadline_ms), "--out", str(out)])
    finally:
        run([*EDGE, "fleet", "down", "--dir", str(fleet)])
    report = json.loads((out / "hil_report.json").read_text())
    devices = report["devices"].values()
    answered = sum(d["answered"] for d in devices)
    return {"daemons": size, "decisions": report["decisions"], "answered": answered,
            "missing": sum(d["missing"] for d in devices), "wall_seconds": report["wall_seconds"],
            "device_decisions_per_s": answered / report["wall_seconds"],
            "plant_steps_per_s": report["decisions"] / report["wall_seconds"],
            "rtt_p50_ms": max(d["rtt_p50_ms"] or 0.0 for d in devices),
            "rtt_p99_ms": max(d["rtt_p99_ms"] or 0.0 for d in devices),
            "violations": report["total_violations"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,8,16", help="Fleet sizes to measure (comma-separated, ≤ 16).")
    parser.add_argument("--episode-seconds", type=float, default=900.0, help="Simulated seconds per run.")
    parser.add_argument("--deadline-ms", type=float, default=250.0, help="The plant's answer deadline.")
    parser.add_argument("--json", type=Path, help="Write the figures here.")
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="reled-hil-bench-") as tmp:
        root = Path(tmp)
        model = root / "policy.onnx"
        run([*RELED, "export", "--scenario", SCENARIO, "--out", str(model), "--holdout-decisions", "20"])
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(measure(model, size, root, args.episode_seconds, args.deadline_ms))
            console.print(f"{size} daemons: {rows[-1]['device_decisions_per_s']:.0f} decisions/s, "
                          f"RTT p99 {rows[-1]['rtt_p99_ms']:.1f} ms", highlight=False)
    table = Table(title=f"HIL on {SCENARIO}, --speed max, {args.episode_seconds:g} simulated s per run "
                        f"({platform.machine()}, {len(os.sched_getaffinity(0))} cores)")
    for column in ("daemons", "decisions/s (devices)", "plant steps/s", "RTT p50 (ms, worst device)",
                   "RTT p99 (ms, worst device)", "missing", "violations"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["daemons"]), f"{r['device_decisions_per_s']:.0f}", f"{r['plant_steps_per_s']:.1f}",
                      f"{r['rtt_p50_ms']:.1f}", f"{r['rtt_p99_ms']:.1f}", str(r["missing"]), str(r["violations"]))
    console.print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps({"scenario": SCENARIO, "episode_seconds": args.episode_seconds,
                                                 "deadline_ms": args.deadline_ms, "machine": platform.node(),
                                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
