"""A HIL run's report as people read it: a rich table per device, the traffic line, JSON and a timeline plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_write_text
from trainer.hil.run import HilReport
from trainer.plots import plt, save_figure
from trainer.sim.metrics import METRIC_LABELS

DEVICE_COLUMNS = {"light": "light", "answered": "answered", "missing": "missing", "late": "late",
                  "invalid": "invalid", "device_fallback": "device fallback", "overrides": "shield overrides",
                  "resyncs": "resyncs", "rtt_p50_ms": "RTT p50 (ms)", "rtt_p99_ms": "RTT p99 (ms)"}


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.1f}"
    return str(value)


def device_table(report: HilReport) -> Table:
    table = Table(title=f"HIL {report.settings['scenario']} ({report.settings['demand']}, seed "
                        f"{report.settings['seed']}): {report.decisions} decisions, speed {report.settings['speed']}")
    table.add_column("device")
    for label in DEVICE_COLUMNS.values():
        table.add_column(label, justify="right")
    for device, row in report.devices.items():
        table.add_row(device, *(_fmt(row[key]) for key in DEVICE_COLUMNS))
    return table


def summary_lines(report: HilReport) -> list[str]:
    m = report.metrics
    traffic = ", ".join(f"{METRIC_LABELS[k]} {_fmt(float(m[k]))}" for k in METRIC_LABELS if k in m)
    worst = max((d["rtt_p99_ms"] for d in report.devices.values() if d["rtt_p99_ms"] is not None),
                default=math.nan)
    lines = [f"traffic: {traffic}",
             f"safety: {report.total_violations} violations found by the independent audit"
             + (f" {report.violations}" if report.violations else ""),
             f"timing: worst device RTT p99 {worst:.1f} ms; lag behind schedule p50 "
             f"{report.lag_ms['p50']:.1f} ms, p99 {report.lag_ms['p99']:.1f} ms, max {report.lag_ms['max']:.1f} ms; "
             f"{report.decisions} decisions in {report.wall_seconds:.1f} s wall",
             f"faults: {len(report.events)} event(s)" + (f" (and {report.events_dropped} more not kept)"
                                                          if report.events_dropped else "")]
    lines += [f"  {e['device']} {e['kind']} from t={e['first_t']:.0f} to t={e['last_t']:.0f} "
              f"({e['decisions']} decisions): {e['detail']}" for e in report.events[:20]]
    if report.undriven:
        lines.append(f"no device for {len(report.undriven)} light(s), run by the fixed-time plan: "
                     + ", ".join(report.undriven[:8]))
    return lines


def write_report(report: HilReport, folder: Path) -> tuple[Path, Path]:
    """``hil_report.json`` and ``hil_timeline.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hil_report.json"
    atomic_write_text(path, json.dumps(report.as_dict(), indent=1, default=float))
    return path, timeline_plot(report, folder / "hil_timeline.png")


def timeline_plot(report: HilReport, path: Path) -> Path:
    """Round-trip times and lag (top) over the congestion (bottom), with the decisions that fell back marked."""
    line = report.timeline
    t = (np.array(line["t"]) - line["t"][0]) / 60 if line["t"] else np.zeros(0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    top.plot(t, np.array(line["rtt_max_ms"], dtype=float), ".", ms=3, label="slowest device's round trip (ms)")
    top.plot(t, line["lag_ms"], "-", lw=1, label="lag behind schedule (ms)")
    top.axhline(report.settings["deadline_ms"], color="grey", ls="--", lw=1, label="deadline")
    top.set_yscale("symlog", linthresh=1)
    top.set_ylabel("ms")
    top.legend(fontsize=8, loc="upper right")
    bottom.plot(t, line["queued"], color="#C44E52", lw=1, label="queued vehicles at controlled lights")
    fell_back = np.array(line["fallbacks"]) > 0
    if fell_back.any():
        bottom.plot(t[fell_back], np.array(line["queued"])[fell_back], "kx", ms=4, label="a light fell back")
    bottom.set_xlabel("simulated minutes")
    bottom.set_ylabel("vehicles")
    bottom.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"HIL {report.settings['scenario']}: delay {report.metrics['avg_delay']:.1f} s, "
                 f"{report.total_violations} safety violations")
    return save_figure(fig, path)


def load_eval(eval_json: Path, scenario: str) -> dict[str, Any]:
    """A `reled eval --json` file of ``scenario`` (read before a HIL run, so a wrong file fails at once)."""
    try:
        evaluated = json.loads(eval_json.read_text())
        evaluated["summary"]["avg_delay"], evaluated["episodes"]  # what the comparison reads
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RELEDError(f"--compare {eval_json}: not a `reled eval --json` file ({exc})") from None
    if evaluated.get("scenario") != scenario:
        raise RELEDError(f"--compare {eval_json} evaluated {evaluated.get('scenario')!r}, not {scenario!r}: compare "
                         "runs of one scenario")
    return evaluated


def compare_with_eval(report: HilReport, evaluated: dict[str, Any]) -> tuple[Table, dict[str, tuple[float, float]]]:
    """One table: every controller of a `reled eval` file (mean ± std over its seeds) and this HIL run, on the same
    metrics; and the delays for a bar chart."""
    summary = evaluated["summary"]
    seeds = len({e["seed"] for e in evaluated["episodes"]})
    keys = [k for k in ("avg_delay", "avg_travel_time", "avg_waiting_time", "throughput") if k in summary]
    table = Table(title=f"{report.settings['scenario']} ({report.settings['demand']}): simulation "
                        f"(`reled eval`, {seeds} seed(s)) and hardware-in-the-loop (seed {report.settings['seed']})")
    table.add_column("controller")
    for key in keys:
        table.add_column(METRIC_LABELS[key], justify="right")
    delays: dict[str, tuple[float, float]] = {}
    for name in summary["avg_delay"]:
        table.add_row(name, *(f"{summary[k][name]['mean']:.1f} ± {summary[k][name]['std']:.1f}" for k in keys))
        delays[name.split(" (")[0]] = (summary["avg_delay"][name]["mean"], summary["avg_delay"][name]["std"])
    table.add_row(f"HIL: {len(report.devices)} controller processes over MQTT",
                  *(f"{report.metrics[k]:.1f}" for k in keys), style="bold")
    delays[f"HIL ({len(report.devices)} daemons)"] = (report.metrics["avg_delay"], 0.0)
    return table, delays
