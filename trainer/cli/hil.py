"""`reled hil run`: the controllers of a fleet drive a SUMO city over MQTT (hardware-in-the-loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_runtime.errors import RELEDError
from trainer.cli.common import console, progress_bar
from trainer.cli.options import DEMAND


def parse_speed(text: str) -> float | None:
    """``max`` → None (as fast as the devices answer), else a positive factor."""
    if text.strip().lower() == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        raise RELEDError(f"--speed {text!r}: give a factor such as 10 or the word max") from None
    if not speed > 0:
        raise RELEDError(f"--speed must be > 0 or max, got {text}")
    return speed


def run_command(
    scenario: Annotated[str, typer.Option(help="Scenario name (see `reled scenarios`) or folder.")],
    fleet: Annotated[Path, typer.Option(help="Fleet folder from `reled-edge fleet up --hil` (keys/, broker/, "
                                             "devices/).")],
    speed: Annotated[str, typer.Option(help="Simulated seconds per wall second, or max (as fast as the devices "
                                            "answer).")] = "10",
    demand: str = DEMAND,
    seed: Annotated[int, typer.Option(help="SUMO seed.")] = 0,
    deadline_ms: Annotated[float, typer.Option(help="Wait this long for each decision's answers; a device later "
                                                    "than that gets the fixed-time plan for the step.")] = 250.0,
    fallback_green: Annotated[float, typer.Option(help="Green seconds per phase of the plant's fixed-time plan.")]
    = 30.0,
    episode_seconds: Annotated[float | None, typer.Option(help="Simulate this long \\[default: the scenario's "
                                                                "episode].")] = None,
    out: Annotated[Path | None, typer.Option(help="Write hil_report.json and hil_timeline.png here.")] = None,
) -> None:
    """Run one SUMO episode whose lights are driven by the fleet's controller processes over MQTT: each decision
    sends every device its light's detector readings and waits for the signal states it times; a late, silent or
    wrong device gets the fixed-time plan for that step. Reports traffic metrics as `reled eval` does, per-device
    round-trip times, fallbacks, shield overrides and an independent audit of every state shown."""
    from trainer.hil.report import device_table, summary_lines, write_report
    from trainer.hil.run import HilSettings, run_hil

    settings = HilSettings(scenario=scenario, fleet=fleet.resolve(), speed=parse_speed(speed), demand=demand,
                           seed=seed, deadline_ms=deadline_ms, fallback_green=fallback_green,
                           episode_seconds=episode_seconds)
    with progress_bar() as progress:
        task = progress.add_task(f"HIL {scenario}", total=1.0)
        report = run_hil(settings, lambda frac: progress.update(task, completed=frac))
    console.print(device_table(report))
    for line in summary_lines(report):
        console.print(line, highlight=False)
    if out is not None:
        for path in write_report(report, out):
            console.print(f"wrote {path}")
    if report.total_violations:
        raise typer.Exit(1)
