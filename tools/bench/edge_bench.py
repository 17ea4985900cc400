#!/usr/bin/env python3
"""Edge runtime figures: decision latency, fleet deploy time, rollout throughput, daemon memory.

Why: the controller decides every few seconds on a Raspberry Pi-class CPU, next to MQTT and SQLite;
the fleet tools must push a model to many intersections quickly and take their rollouts back.
Targets: ONNX Runtime decision p99 < 1 ms (1 thread); one policy deployed to 20 daemons on loopback
in < 5 s; daemon resident memory < 150 MB.

1. Latency: one decision (batch of 1, as the controller runs it) through ONNX Runtime, fp32 and
   int8, with 1 intra-op thread, against torch eager (1 thread) on the same inputs in the same run.
   ``decide`` is the controller's whole call (session + checks + log-prob); ``session`` is ORT alone.
2. Deploy: 20 `reled-edge daemon` processes and a real Mosquitto on loopback; the time from the
   first signed command to the last COMMITTED report (download, verification, shadow self-test,
   swap and a 5-decision probation at 50x signal time). The daemons share this machine's cores, so
   their latency budget is widened to 100 ms (a street controller runs alone on its CPU: 5 ms).
3. Rollouts: 256-row batches published by one device and written + acknowledged by
   `reled-edge collect` (a separate process): rows per second end to end.
4. Memory: resident set size of each daemon with its policy loaded.

    .venv/bin/python tools/bench/edge_bench.py                     # about 1 min
    .venv/bin/python tools/bench/edge_bench.py --run runs/NAME --daemons 20 --json docs/results/bench_edge.json
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from rich.console import Console
from rich.table import Table

from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.fileio import atomic_write_text
from edge_runtime.fleet.local import LocalFleet, wait_for
from edge_runtime.fleet.server import Model
from edge_runtime.mqtt import BrokerAddress, Link
from edge_runtime.policy import OnnxPolicy
from edge_runtime.protocol import device_topic
from edge_runtime.rollouts import Batch, pack
from trainer.export import ExportRequest, export_policy, load_actor

ROLLOUT_DEVICE = "streamer"  # publishes the rollout batches; no daemon runs with its credentials
TARGETS = {"onnx_p99_ms": 1.0, "deploy_20_seconds": 5.0, "daemon_rss_mb": 150.0}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def latency(fp32: Path, int8: Path, actor: torch.nn.Module, n: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    obs = rng.gamma(2.0, 4.0, size=(n, feature_size())).astype(np.float32)
    mask = np.zeros((n, MAX_PHASES), dtype=bool)
    mask[:, :2] = True
    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        policy = OnnxPolicy(path, threads=1)
        for i in range(50):
            policy.decide(obs[i], mask[i])
        out[f"{name} decide"] = percentiles([policy.decide(obs[i], mask[i]).seconds for i in range(n)])
        timings = []
        for i in range(n):
            start = time.perf_counter()
            policy.session.run(None, {"obs": obs[i:i + 1], "mask": mask[i:i + 1]})
            timings.append(time.perf_counter() - start)
        out[f"{name} session"] = percentiles(timings)
    timings = []
    with torch.no_grad():
        for i in range(50):
            actor(torch.from_numpy(obs[i:i + 1]), torch.from_numpy(mask[i:i + 1]))
        for i in range(n):
            start = time.perf_counter()
            logits = actor(torch.from_numpy(obs[i:i + 1]), torch.from_numpy(mask[i:i + 1]))
            int(logits.argmax(-1))
            timings.append(time.perf_counter() - start)
    out["torch eager (peer)"] = percentiles(timings)
    return out


def deploy_time(fleet: LocalFleet, model_path: Path, n: int) -> dict[str, float]:
    from edge_runtime.device.device_config import device_files
    from edge_runtime.fleet.deploy import DONE, deploy, select_devices

    server = fleet.observer()
    try:
        wait_for(lambda: len(server.reported) >= n, 120, f"{n} daemons reporting", poll=lambda: server.pump(0.1))
        configs = select_devices(device_files(fleet.devices), [], "bench")
        start = time.monotonic()
        results = deploy(server, Model.load(model_path), configs, timeout=120)
        seconds = time.monotonic() - start
    finally:
        server.close()
    committed = sum(r.outcome == DONE for r in results)
    return {"daemons": n, "committed": committed, "seconds": seconds,
            "slowest_device_seconds": max(r.seconds for r in results),
            "failures": {r.device: r.detail for r in results if r.outcome != DONE}}


def write_devices(fleet: LocalFleet, model: Path, n: int, sites: list[str] = ()) -> None:
    """The files of ``n`` bench daemons (group `bench`, spread evenly over ``sites`` when given) and of the rollout
    streamer (credentials only, on the first site)."""
    tables = list(OnnxPolicy(model).meta.phase_tables.items())
    for k in range(n):
        light, greens = tables[k % len(tables)]
        fleet.write_device(f"dev{k}", light, greens, replay_seed=k, groups=("bench",),
                           site=sites[k * len(sites) // n] if sites else None,
                           runtime={"decision_seconds": 1.0, "speed": 50.0}, probation={"decisions": 5},
                           # n daemons share this machine's cores (a controller has its own): scheduling stalls of
                           # several ms are this bench's, not the policy's, so widen the budget
                           inference={"latency_budget_ms": 100.0})
    fleet.write_device(ROLLOUT_DEVICE, *tables[0], groups=("spare",), site=sites[0] if sites else None)


def rollout_rate(fleet: LocalFleet, batches: int, rows: int, port: int | None = None) -> dict[str, float]:
    """Rows per second from a device publishing on ``port`` (default: the fleet's broker) to `reled-edge collect`
    on the fleet's broker and its acknowledgements back."""
    out = fleet.root / "rollouts"
    collector = fleet.edge_background("collect", "--out", str(out), log=fleet.root / "collect.log")
    # a device of its own: the broker binds client ids to users, so a second connection with a running daemon's
    # credentials would take its session over (and the daemon would take it back)
    password = (fleet.keys / "credentials" / f"{ROLLOUT_DEVICE}.secret").read_text().strip()
    link = Link(BrokerAddress("127.0.0.1", port or fleet.port, ROLLOUT_DEVICE, password), f"bench-{ROLLOUT_DEVICE}",
                [device_topic(ROLLOUT_DEVICE, "rollouts/ack")]).start()
    acked: dict[int, set[int]] = {}  # epoch -> acknowledged seqs

    def take_acks(wait: float) -> None:
        try:
            message = link.inbox.get(timeout=wait)
        except queue.Empty:
            return
        ack = json.loads(message.payload)
        acked.setdefault(ack["epoch"], set()).add(ack["seq"])

    try:
        rng = np.random.default_rng(0)

        def batch(epoch: int, seq: int) -> bytes:
            columns = {"decision": np.arange(rows) + seq * rows, "time": np.arange(rows, dtype=float),
                       "obs": rng.gamma(2.0, 4.0, (rows, feature_size())), "mask": np.ones((rows, MAX_PHASES), bool),
                       "action": rng.integers(0, 2, rows), "log_prob": rng.normal(size=rows),
                       "override": np.zeros(rows, bool), "reward": -rng.poisson(5, rows), "source": np.zeros(rows),
                       "policy_version": np.ones(rows)}
            return pack(Batch(ROLLOUT_DEVICE, epoch, seq, columns))

        payloads = [batch(99, seq) for seq in range(1, batches + 1)]
        # the collector is listening once it acknowledges a warm-up batch (epoch 98, not timed)
        warm_up, resend_at = batch(98, 1), 0.0

        def collector_ready() -> bool:
            nonlocal resend_at
            if time.monotonic() >= resend_at:
                link.publish(device_topic(ROLLOUT_DEVICE, "rollouts"), warm_up)
                resend_at = time.monotonic() + 1.0
            return bool(acked.get(98))
        wait_for(collector_ready, 120, "the collector to acknowledge a batch", poll=lambda: take_acks(0.1))
        start = time.monotonic()
        for payload in payloads:
            link.publish(device_topic(ROLLOUT_DEVICE, "rollouts"), payload)
        deadline = time.monotonic() + 120
        while len(acked.get(99, ())) < batches and time.monotonic() < deadline:
            take_acks(0.5)
        seconds = time.monotonic() - start
    finally:
        link.close()
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=20)
    done = len(acked.get(99, ()))
    return {"batches": batches, "rows_per_batch": rows, "acked": done, "seconds": seconds,
            "rows_per_second": done * rows / seconds,
            "bytes_per_row": float(np.mean([len(p) for p in payloads])) / rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a training run to export (default: a fresh grid2x2 actor)")
    parser.add_argument("--daemons", type=int, default=20, help="daemon processes in the deploy test")
    parser.add_argument("--decisions", type=int, default=5000, help="timed decisions per runtime")
    parser.add_argument("--batches", type=int, default=200, help="rollout batches (256 rows each)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="reled-edge-bench-") as tmp:
        root = Path(tmp)
        request = ExportRequest(out=root / "policy.onnx", run=args.run, scenario=None if args.run else "grid2x2",
                                int8=True, policy_version=1, holdout_decisions=30)
        report = export_policy(request)
        actor = load_actor(request).actor
        lat = latency(report.fp32, report.int8, actor, args.decisions)

        fleet = LocalFleet(root / "fleet")
        write_devices(fleet, report.fp32, args.daemons)
        fleet.init_keys()
        fleet.start_broker()
        try:
            for k in range(args.daemons):
                fleet.start_daemon(f"dev{k}")
            dep = deploy_time(fleet, report.fp32, args.daemons)
            rss = [psutil.Process(p.pid).memory_info().rss / 2**20 for p in fleet.daemons.values()]
            roll = rollout_rate(fleet, args.batches, 256)
        finally:
            fleet.close()

    table = Table(title=f"decision latency, batch of 1, 1 thread ({args.decisions} decisions)")
    for column in ("runtime", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right" if column != "runtime" else "left")
    for name, figures in lat.items():
        table.add_row(name, f"{figures['p50_ms']:.4f}", f"{figures['p99_ms']:.4f}", f"{figures['mean_ms']:.4f}")
    console.print(table)
    torch_p99 = lat["torch eager (peer)"]["p99_ms"]
    for name in ("onnxruntime fp32 decide", "onnxruntime int8 decide"):
        console.print(f"{name}: p99 {lat[name]['p99_ms']:.3f} ms = {lat[name]['p99_ms'] / torch_p99:.2f}x torch "
                      f"eager's p99 (target < {TARGETS['onnx_p99_ms']} ms)")
    console.print(f"deploy to {dep['daemons']} daemons: {dep['committed']} committed in {dep['seconds']:.2f} s "
                  f"(target < {TARGETS['deploy_20_seconds']} s)")
    for device, detail in dep["failures"].items():
        console.print(f"[red]{device} failed[/]: {detail}")
    console.print(f"rollouts: {roll['rows_per_second']:,.0f} rows/s through the broker and collector "
                  f"({roll['acked']}/{roll['batches']} batches acknowledged, {roll['bytes_per_row']:.0f} B/row "
                  "compressed)")
    console.print(f"daemon RSS: mean {np.mean(rss):.1f} MB, max {max(rss):.1f} MB "
                  f"(target < {TARGETS['daemon_rss_mb']} MB)")
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count()},
            "policy": str(args.run or "fresh grid2x2 actor"), "latency": lat, "deploy": dep, "rollouts": roll,
            "daemon_rss_mb": {"mean": float(np.mean(rss)), "max": float(max(rss))},
            "targets": TARGETS,
            "passed": {"onnx_p99_ms": lat["onnxruntime fp32 decide"]["p99_ms"] < TARGETS["onnx_p99_ms"],
                       "deploy_20_seconds": dep["committed"] == dep["daemons"]
                       and dep["seconds"] < TARGETS["deploy_20_seconds"],
                       "daemon_rss_mb": max(rss) < TARGETS["daemon_rss_mb"]}}, indent=2) + "\n")
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
