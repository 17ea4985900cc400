"""`reled update`: train a run further on its controllers' street rollouts, mixed with simulation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from trainer.cli.common import console, err_console, progress_bar
from trainer.cli.options import Flag, Given, OptionGroup, Setting, default_note

if TYPE_CHECKING:
    from trainer.marl.street_update import UpdateReport

UPDATE = "trainer.marl.street_update:update_from_street"
UPDATES = Setting(UPDATE, Flag("updates", int, "PPO updates, each with the run's simulated episodes plus the street "
                                               "rows.", min=1))
STREET = OptionGroup(
    UPDATE,
    Flag("street_share", float, "Largest share of street rows among a batch's agent rows (more are subsampled); "
                                "in (0, 1).", min=0.0, max=1.0),
    Flag("rho_max", float, "ρ̄: truncation of the importance weights π/μ (V-trace).", min=1e-6),
    Flag("fallback", bool, "Learn from the fixed-time fallback rows too (behaviour policy: the plan, μ = 1)."),
    Flag("workers", int, "SUMO worker processes (results do not depend on it)", none="the run's", min=1),
)


def update_command(
    run: Annotated[Path, typer.Option(help="The run folder to update (runs/NAME, IPPO or RELED).")],
    rollouts: Annotated[Path, typer.Option(help="The collector's folder (DEVICE/EPOCH/SEQ.npz).")],
    devices: Annotated[Path, typer.Option(help="Folder of the fleet's device files: each maps a device to its "
                                               "light (\\[device] intersection).")],
    version: Annotated[list[int] | None, typer.Option(
        metavar="V", help="A policy_version this run exported (repeat for each); policy rows of other models are "
                          "dropped.")]
    = None,
    updates: int = UPDATES,
    street: Given = STREET,
    out: Annotated[Path | None, typer.Option(help="Update a copy of the run in this new folder "
                                                  + default_note("update RUN in place"))] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")] = None,
) -> None:
    """Train RUN further on street rollouts mixed with its simulated episodes (the closed loop's learning step).

    The rollouts are screened (every row counted: kept, or why not), rebuilt into each controller's decision
    sequences and corrected off-policy with the recorded log-probabilities (V-trace, ρ = min(ρ̄, π/μ)). Each
    update writes latest.pt, best.pt and a metrics.csv row (street_rows, street_share, rho_mean,
    rho_clipped_fraction), so `reled export --run RUN` exports the updated policy. See docs/training.md."""
    from edge_runtime.device.device_config import device_files
    from edge_runtime.errors import RELEDError
    from edge_runtime.fileio import atomic_write_text
    from trainer.marl.street_update import update_from_street

    if not version:
        raise RELEDError("give --version V for each policy_version this run exported (`reled export` prints "
                         "'policy vN'), so rows of other models are told apart")
    lights = {device_id: config.device.intersection for device_id, config in device_files(devices).items()}
    with progress_bar() as bar:
        task = bar.add_task(f"updating {run.name} on street rollouts", total=updates)

        def on_update(row: dict[str, Any]) -> None:
            bar.advance(task)
            if not err_console.is_terminal:
                console.print(f"update {row['update']}: {row['street_rows']} street rows "
                              f"({row['street_share']:.0%}), eval delay {row['eval_delay']:.1f} s")

        report = update_from_street(run, rollouts, lights, set(version), updates=updates, out=out,
                                    on_update=on_update, **street)
    for problem in report.unreadable[:5]:
        err_console.print(f"[yellow]unreadable[/]: {escape(problem)}")
    console.print(_screening_table(report))
    console.print(_change_table(report))
    if json_out:
        atomic_write_text(json_out, json.dumps(report.as_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    console.print(f"wrote {report.run}/ (latest.pt, best.pt, metrics.csv): `reled export --run {report.run}`")


def _screening_table(report: UpdateReport) -> Table:
    table = Table(title=f"street rollouts: {report.read:,} rows read",
                  caption=f"{len(report.unreadable)} unreadable file(s), see above" if report.unreadable else None)
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    for outcome, rows in report.counts.items():
        table.add_row(outcome, f"{rows:,}")
    return table


def _change_table(report: UpdateReport) -> Table:
    table = Table(title=f"{report.run.name}: {report.sequences} sequences, {report.transitions:,} transitions")
    table.add_column("figure")
    table.add_column("value (each update)" if len(report.street_rows) > 1 else "value", justify="right")
    rho = "-" if report.rho_mean is None else f"{report.rho_mean:.3f}, {report.rho_clipped_fraction:.1%} clipped"
    for name, value in (
        ("street rows", ", ".join(f"{n:,}" for n in report.street_rows)),
        ("street share", ", ".join(f"{s:.0%}" for s in report.street_share)),
        ("importance weight ρ (mean)", rho),
        ("actor ‖Δθ‖", f"{report.param_distance:.4f} ({report.param_distance / max(report.param_norm, 1e-12):.2%} "
                       "of ‖θ‖)"),
        ("greedy actions changed", f"{report.disagreement:.1%} of {report.holdout:,} ({report.holdout_source})"),
        ("simulated eval delay", "-" if report.eval_delay is None else f"{report.eval_delay:.1f} s"),
    ):
        table.add_row(name, value)
    return table
