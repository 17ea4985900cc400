#!/usr/bin/env python3
"""Site brokers bridged to a central broker: deploy time and rollout throughput, against one broker.

Why: a city outgrows one Mosquitto (docs/edge.md, "Site brokers"); every message then crosses a Mosquitto
bridge as well, so this measures what that hop costs, on loopback, with one broker and no bridge as the peer
in the same run (alternating, ``--repeats`` times each):

1. Deploy: ``--daemons`` `reled-edge daemon` processes, spread over 2 site brokers bridged to the central
   broker where the deploy runs (peer: the same daemons on one broker); from the first signed command to the
   last COMMITTED report (download, verification, shadow test, swap, 5-decision probation at 50x), as
   `tools/bench/edge_bench.py` measures it.
2. Rollouts: 256-row batches published by a device on a site broker, written and acknowledged by
   `reled-edge collect` on the central broker, the acknowledgements back through the bridge: rows per
   second end to end (peer: device and collector on one broker).

    .venv/bin/python tools/bench/bridge_bench.py                  # about 2 min
    .venv/bin/python tools/bench/bridge_bench.py --repeats 2 --json docs/results/bench_bridge.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import psutil
from edge_bench import deploy_time, rollout_rate, write_devices
from rich.console import Console
from rich.table import Table

from edge_runtime.fileio import atomic_write_text
from edge_runtime.fleet.local import LocalFleet
from trainer.export import ExportRequest, export_policy

SITES = ["north", "south"]
SETUPS = {"2 site brokers, bridged": SITES, "one broker (peer)": []}


def measure(root: Path, model: Path, daemons: int, batches: int, sites: list[str]) -> dict[str, Any]:
    """Deploy and rollout figures for a fleet of ``daemons`` on ``sites`` (none: on the one broker)."""
    fleet = LocalFleet(root)
    for name in sites:
        fleet.add_site(name)
    write_devices(fleet, model, daemons, sites)
    fleet.init_keys()
    fleet.start_broker()
    try:
        for name in sites:
            fleet.start_site(name)
        for k in range(daemons):
            fleet.start_daemon(f"dev{k}")
        deploy = deploy_time(fleet, model, daemons)
        rollouts = rollout_rate(fleet, batches, 256, fleet.sites[sites[0]].port if sites else None)
    finally:
        fleet.close()
    return {"deploy": deploy, "rollouts": rollouts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daemons", type=int, default=20, help="daemon processes, half on each site broker")
    parser.add_argument("--batches", type=int, default=200, help="rollout batches (256 rows each)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setup, alternating")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory(prefix="reled-bridge-bench-") as tmp:
        root = Path(tmp)
        model = export_policy(ExportRequest(out=root / "policy.onnx", scenario="grid2x2", policy_version=1,
                                            holdout_decisions=30)).fp32
        for repeat in range(args.repeats):
            for name, sites in SETUPS.items():
                console.print(f"run {repeat + 1}/{args.repeats}: {name}")
                runs[name].append(measure(root / f"{name.replace(' ', '-')}-{repeat}", model, args.daemons,
                                          args.batches, sites))

    def median(name: str, part: str, key: str) -> float:
        return statistics.median(run[part][key] for run in runs[name])

    table = Table(title=f"loopback, median of {args.repeats} run{'s' * (args.repeats > 1)} each")
    for column in ("figure", *SETUPS):
        table.add_column(column, justify="right" if column != "figure" else "left")
    table.add_row(f"deploy to {args.daemons} daemons, s", *(f"{median(n, 'deploy', 'seconds'):.2f}" for n in SETUPS))
    table.add_row("committed (each run)", *(" / ".join(str(r["deploy"]["committed"]) for r in runs[n]) for n in SETUPS))
    table.add_row("rollouts end to end, rows/s",
                  *(f"{median(n, 'rollouts', 'rows_per_second'):,.0f}" for n in SETUPS))
    table.add_row("batches acknowledged (each run)", *(" / ".join(f"{r['rollouts']['acked']}/{r['rollouts']['batches']}"
                                                        for r in runs[n]) for n in SETUPS))
    console.print(table)
    for name in SETUPS:
        for run in runs[name]:
            for device, detail in run["deploy"]["failures"].items():
                console.print(f"[red]{name}: {device} failed[/]: {detail}")
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count()},
            "daemons": args.daemons, "sites": SITES, "runs": runs,
            "median": {n: {"deploy_seconds": median(n, "deploy", "seconds"),
                           "rollout_rows_per_second": median(n, "rollouts", "rows_per_second")} for n in SETUPS},
        }, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
