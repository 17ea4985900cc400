#!/usr/bin/env python3
"""HIL against simulation, per scenario: the table of docs/hil.md §6 from `reled hil run` and `reled eval` outputs.

Reads ``DIR/<name>-s<seed>/hil_report.json`` (one HIL run per seed) and ``DIR/eval-<scenario>.json`` (`reled eval
--policy X.onnx --seeds N --json`), prints a markdown table and writes the figures as JSON:

    .venv/bin/python tools/hil_results.py --dir out/hil --runs cologne8,cologne8-b25:cologne8,orlando \\
        --json docs/results/hil.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_runtime.fileio import atomic_write_text


def summarize(folder: Path, name: str, scenario: str) -> dict:
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{name}-s[0-9]*/hil_report.json"))]
    evaluated = json.loads((folder / f"eval-{scenario}.json").read_text())
    hil = [r["metrics"]["avg_delay"] for r in reports]
    sim = [e["avg_delay"] for e in evaluated["episodes"] if e["controller"].startswith("onnx:")]
    devices = [d for r in reports for d in r["devices"].values()]
    return {
        "name": name, "scenario": scenario, "seeds": [r["settings"]["seed"] for r in reports],
        "daemons": len(reports[0]["devices"]), "speed": reports[0]["settings"]["speed"],
        "hil_delay": hil, "eval_delay": sim,
        "hil_mean": float(np.mean(hil)), "hil_std": float(np.std(hil, ddof=1)) if len(hil) > 1 else 0.0,
        "eval_mean": float(np.mean(sim)), "eval_std": float(np.std(sim, ddof=1)) if len(sim) > 1 else 0.0,
        "rtt_p50_ms_worst": max(d["rtt_p50_ms"] or 0.0 for d in devices),
        "rtt_p99_ms_worst": max(d["rtt_p99_ms"] or 0.0 for d in devices),
        "lag_p99_ms_worst": max(r["lag_ms"]["p99"] for r in reports),
        "violations": sum(r["total_violations"] for r in reports),
        "missing": sum(d["missing"] for d in devices),
        "device_fallback": sum(d["device_fallback"] for d in devices),
        "decisions": sum(r["decisions"] for r in reports) * len(reports[0]["devices"]),
        "wall_seconds": [r["wall_seconds"] for r in reports],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("out/hil"))
    parser.add_argument("--runs", default="cologne8,orlando",
                        help="Run names, comma-separated; NAME:SCENARIO when the name is not the scenario's.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for item in args.runs.split(","):
        name, _, scenario = item.partition(":")
        rows.append(summarize(args.dir, name, scenario or name))
    print("| run | daemons | speed | HIL delay (s), per seed | mean ± std | `reled eval` (s), per seed | mean ± std "
          "| worst RTT p50 / p99 (ms) | lag p99 (ms) | violations | missing | device fallbacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['daemons']} | {r['speed']}× | {', '.join(f'{d:.2f}' for d in r['hil_delay'])} | "
              f"{r['hil_mean']:.2f} ± {r['hil_std']:.2f} | {', '.join(f'{d:.2f}' for d in r['eval_delay'])} | "
              f"{r['eval_mean']:.2f} ± {r['eval_std']:.2f} | {r['rtt_p50_ms_worst']:.1f} / "
              f"{r['rtt_p99_ms_worst']:.1f} | {r['lag_p99_ms_worst']:.1f} | {r['violations']} | {r['missing']} | "
              f"{r['device_fallback']} of {r['decisions']} |")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
