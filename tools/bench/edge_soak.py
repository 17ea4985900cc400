#!/usr/bin/env python3
"""A controller daemon over time: its resident memory while it decides, and the cost of one decision.

Why: a street controller runs for months on a few hundred MB; memory that creeps up per decision ends in
an OOM kill, and every guard the hardening added (bounded decoding, guarded steps, fault counting)
sits in the decision loop, so its cost must be measured, not assumed.

1. Soak: one real `reled-edge daemon` process with a committed policy, deciding 100 times per second
   (1 s decisions at 100x signal time) through a real Mosquitto while `reled-edge collect` takes its
   rollouts; its RSS is sampled every 5 s. Target: < 80 MB after 10 minutes.
2. Decision cost, in this process: ``DeviceDaemon.decide`` (sensor, features, ONNX Runtime with one
   intra-op thread, shield, actuator, SQLite outbox insert), the outbox housekeeping the loop does after it
   (sealing batches, checkpoints), and the ONNX Runtime session alone, p50/p99.
   Run it on another checkout to compare (the peer is the code before a change):

    .venv/bin/python tools/bench/edge_soak.py                      # 10 minutes
    .venv/bin/python tools/bench/edge_soak.py --seconds 60 --json out/soak.json
    # the same for older code: run it from that checkout (`python -m` puts the working directory first on
    # the path, so the daemons it starts run that checkout's code too)
    repo=$PWD && git worktree add /tmp/before 1706f96 && cd /tmp/before && \\
        PYTHONPATH=/tmp/before $repo/.venv/bin/python $repo/tools/bench/edge_soak.py
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

import edge_runtime
from edge_runtime.fileio import atomic_write_text
from edge_runtime.fleet.local import LocalFleet
from edge_runtime.policy import OnnxPolicy

TARGET_RSS_MB = 80.0


def device(fleet: LocalFleet, policy: Path, speed: float) -> str:
    light, greens = next(iter(OnnxPolicy(policy).meta.phase_tables.items()))
    fleet.write_device("dev0", light, greens, runtime={"decision_seconds": 1.0, "speed": speed},
                       probation={"decisions": 5}, inference={"latency_budget_ms": 100.0})
    return "dev0"


def decision_cost(root: Path, policy: Path, n: int) -> dict[str, dict[str, float]]:
    """p50/p99 of the daemon's whole decision and of the ORT session alone (no broker needed: the link only
    retries in the background)."""
    from edge_runtime.device.daemon import DeviceDaemon
    from edge_runtime.device.device_config import load_device_config

    fleet = LocalFleet(root / "cost")
    name = device(fleet, policy, speed=1.0)
    fleet.init_keys()
    daemon = DeviceDaemon(load_device_config(fleet.devices / f"{name}.toml"))
    daemon.deployment.policy = OnnxPolicy(policy, threads=1)
    if hasattr(daemon, "open_outbox"):
        daemon.open_outbox()
    whole, housekeeping, session = [], [], []
    try:
        for i in range(n + 50):
            start = time.perf_counter()
            daemon.decide(float(i))
            between = time.perf_counter()
            daemon.rollouts_step()  # what the loop does between decisions: seal batches, checkpoint the outbox
            if i >= 50:
                whole.append(between - start)
                housekeeping.append(time.perf_counter() - between)
        obs = np.zeros((1, len(daemon.deployment.policy.meta.selftest.obs[0])), dtype=np.float32)
        mask = daemon.mask[None, :]
        for _ in range(n):
            start = time.perf_counter()
            daemon.deployment.policy.run(obs, mask)
            session.append(time.perf_counter() - start)
    finally:
        daemon.shutdown()

    def figures(seconds: list[float]) -> dict[str, float]:
        ms = np.asarray(seconds) * 1000
        return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    return {"daemon decide": figures(whole), "outbox housekeeping after it": figures(housekeeping),
            "onnxruntime session": figures(session)}


def soak(root: Path, policy: Path, seconds: float, console: Console) -> dict[str, object]:
    fleet = LocalFleet(root / "soak")
    name = device(fleet, policy, speed=100.0)
    fleet.init_keys()
    fleet.start_broker()
    samples: list[tuple[float, float]] = []
    try:
        proc = fleet.start_daemon(name)
        fleet.edge("deploy", "--device", name, "--model", str(policy), "--timeout", "120", check=True)
        fleet.edge_background("collect", "--out", str(root / "rollouts"), log=root / "collect.log")
        server = fleet.observer()
        process = psutil.Process(proc.pid)
        start = time.monotonic()
        with console.status("soaking") as status:
            while (elapsed := time.monotonic() - start) < seconds:
                samples.append((elapsed, process.memory_info().rss / 2**20))
                status.update(f"soak {elapsed:.0f}/{seconds:.0f} s: RSS {samples[-1][1]:.1f} MB")
                while time.monotonic() - start < elapsed + 5:  # the next sample; the reports meanwhile
                    server.pump(0.2)
        samples.append((time.monotonic() - start, process.memory_info().rss / 2**20))
        report = server.reported.get(name, {})
        fleet.kill_daemon(name, signal.SIGTERM)
    finally:
        fleet.close()
    return {"seconds": seconds, "decided": report.get("decided", report.get("decisions")),
            "faults": report.get("faults", {}), "rss_mb": samples,
            "rss_first_mb": samples[0][1], "rss_last_mb": samples[-1][1], "rss_max_mb": max(s[1] for s in samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an exported policy (default: export a fresh grid2x2 actor)")
    parser.add_argument("--seconds", type=float, default=600.0, help="soak length (0: decision cost only)")
    parser.add_argument("--decisions", type=int, default=5000, help="timed decisions for the decision cost")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="reled-edge-soak-") as tmp:
        root = Path(tmp)
        policy = args.model
        if policy is None:
            from trainer.export import ExportRequest, export_policy

            policy = export_policy(ExportRequest(out=root / "policy.onnx", scenario="grid2x2", policy_version=1,
                                                 holdout_decisions=20)).fp32
        cost = decision_cost(root, policy, args.decisions)
        result: dict[str, object] = {"code": str(Path(edge_runtime.__file__).parent.parent),
                                     "machine": {"cpu": platform.processor() or platform.machine(),
                                                 "cores": psutil.cpu_count()},
                                     "decision_cost": cost}
        if args.seconds > 0:
            result["soak"] = soak(root, policy, args.seconds, console)
    table = Table(title=f"one decision, 1 thread ({args.decisions} decisions; code in {result['code']})")
    for column in ("what", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for what, figures in cost.items():
        table.add_row(what, f"{figures['p50_ms']:.3f}", f"{figures['p99_ms']:.3f}")
    console.print(table)
    if "soak" in result:
        s = result["soak"]
        marks = [t for t in (0, 60, 300, 600) if t <= s["seconds"]]
        line = ", ".join(f"{next(r for t2, r in s['rss_mb'] if t2 >= t - 1e-9):.1f} MB at {t:.0f} s" for t in marks)
        console.print(f"daemon RSS at 100 decisions/s: {line}, {s['rss_last_mb']:.1f} MB at the end "
                      f"({s['decided']} decisions; target < {TARGET_RSS_MB:g} MB); faults {s['faults'] or 'none'}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
