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
    compare: Annotated[Path | None, typer.Option(help="A `reled eval --json` file of the same scenario: one table "
                                                      "of its controllers and this run (and hil_vs_eval.png in "
                                                      "--out).")] = None,
) -> None:
    """Run one SUMO episode whose lights are driven by the fleet's controller processes over MQTT: each decision
    sends every device its light's detector readings and waits for the signal states it times; a late, silent or
    wrong device gets the fixed-time plan for that step. Reports traffic metrics as `reled eval` does, per-device
    round-trip times, fallbacks, shield overrides and an independent audit of every state shown."""
    from trainer.hil.report import compare_with_eval, device_table, load_eval, summary_lines, write_report
    from trainer.hil.run import HilSettings, run_hil

    evaluated = load_eval(compare, scenario) if compare is not None else None
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
    if evaluated is not None:
        table, delays = compare_with_eval(report, evaluated)
        console.print(table)
        if out is not None:
            from trainer.plots import bar_chart

            title = f"{scenario}: the policy in simulation and on controller processes"
            console.print(f"wrote {bar_chart(delays, 'average delay per vehicle (s)', title, out / 'hil_vs_eval.png')}")
    if report.total_violations:
        raise typer.Exit(1)


def loop_command(
    run: Annotated[Path, typer.Option(help="The training run (IPPO or RELED) the fleet's model was exported from.")],
    fleet: Annotated[Path, typer.Option(help="Fleet folder from `reled-edge fleet up --hil` (with its collector).")],
    out: Annotated[Path, typer.Option(help="The loop's folder: loop.json and, per cycle, its rollouts, updated run, "
                                           "model and HIL reports. Run again to continue.")],
    cycles: Annotated[int, typer.Option(min=1, help="Cycles finished when the command returns (finished ones are "
                                                    "kept).")] = 1,
    scenario: Annotated[str | None, typer.Option(help="Check that the run was trained on this scenario \\[default: "
                                                      "the run's].")] = None,
    canary: Annotated[str | None, typer.Option(help="The device that tries each new model first \\[default: the "
                                                    "first device].")] = None,
    margin: Annotated[float, typer.Option(help="The canary run's delay may exceed the active model's by this "
                                               "fraction at most (negative: it must improve by that much).")]
    = 0.05,
    confirm: Annotated[bool, typer.Option("--confirm/--no-confirm", help="After the canary passed, a HIL run with "
                                                                         "the whole fleet on the new model must pass "
                                                                         "the same gate, else every device is rolled "
                                                                         "back (one canary among many lights does "
                                                                         "not show the fleet-wide effect).")] = True,
    speed: Annotated[str, typer.Option(help="HIL pacing: simulated seconds per wall second, or max.")] = "max",
    seed: Annotated[int, typer.Option(help="SUMO seed of both HIL runs of a cycle (paired comparison).")] = 0,
    demand: str = DEMAND,
    episode_seconds: Annotated[float | None, typer.Option(help="Simulate this long per HIL run \\[default: the "
                                                                "scenario's episode].")] = None,
    deadline_ms: Annotated[float, typer.Option(help="The HIL runs' answer deadline.")] = 250.0,
    updates: Annotated[int, typer.Option(min=1, help="Training updates per cycle.")] = 1,
    street_share: Annotated[float, typer.Option(help="Street rows' share of each update's batch at most.")] = 0.5,
    rho_max: Annotated[float, typer.Option(help="Truncation of the importance weights π/μ.")] = 1.0,
) -> None:
    """The closed loop: per cycle, a HIL run with the active model (the devices' rollouts come back through the
    collector), an update of the run on those rows mixed with simulation, an export, the new model on a canary
    device, a second HIL run on the same seed that must keep the delay within --margin, then the rest of the fleet
    (or a rollback of the canary). Every row is counted from the devices' outboxes to the update."""
    from rich.table import Table

    from trainer.hil.loop import LoopSettings, run_loop
    from trainer.marl.run_folder import read_config

    if scenario is not None and read_config(run).scenario != scenario:
        raise RELEDError(f"{run} was trained on {read_config(run).scenario}, not {scenario}")
    settings = LoopSettings(run=run, fleet=fleet, out=out, cycles=cycles, canary=canary, margin=margin, confirm=confirm,
                            speed=parse_speed(speed), seed=seed, demand=demand, episode_seconds=episode_seconds,
                            deadline_ms=deadline_ms, updates=updates, street_share=street_share, rho_max=rho_max)
    records = run_loop(settings, progress=lambda text: console.print(text, highlight=False))
    table = Table(title=f"closed loop on {fleet.name}: {len(records)} cycle(s)")
    for column in ("cycle", "version", "rows recorded", "collected", "kept", "dropped", "lost", "param Δ",
                   "actions changed", "delay active (s)", "delay canary (s)", "delay fleet (s)", "verdict"):
        table.add_column(column, justify="right")
    for r in records:
        rows, update = r["rows"], r["update"]
        table.add_row(str(r["cycle"]), f"v{r['policy_version']}", str(rows["recorded"]), str(rows["collected"]),
                      str(rows["kept"]), str(rows["dropped"]), str(rows["lost"]),
                      f"{update['param_distance']:.3f}", f"{update['disagreement']:.1%}",
                      f"{r['active']['avg_delay']:.2f}", f"{r['canary_run']['avg_delay']:.2f}",
                      f"{r['fleet_run']['avg_delay']:.2f}" if r.get("fleet_run") else "-", verdict(r))
    console.print(table)
    console.print(f"wrote {out / 'loop.json'}")


def verdict(cycle: dict) -> str:
    """A cycle's outcome in words: adopted, or which gate refused and why."""
    if cycle.get("adopted", cycle["gate"]["passed"]):
        return "adopted"
    refused = cycle.get("confirmation") or cycle["gate"]
    stage = "fleet run" if cycle.get("confirmation") else "canary"
    return f"{stage} refused: " + "; ".join(refused["reasons"])
