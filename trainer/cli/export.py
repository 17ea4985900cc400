"""`reled export`: a trained (or fresh) actor to an ONNX policy file for the intersection controller."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trainer.cli_common import console, err_console, user_errors


def export_command(
    out: Annotated[Path, typer.Option(help="The ONNX file to write (policy.onnx); --int8 adds <stem>.int8.onnx.")],
    run: Annotated[Path | None, typer.Option(help="A run folder (runs/NAME: best.pt, else latest.pt) or a "
                                                  "checkpoint file.")] = None,
    scenario: Annotated[str | None, typer.Option(help="Without --run: export a freshly initialized actor for this "
                                                      "scenario (to test the deployment path).")] = None,
    demand: Annotated[str, typer.Option(help="Demand of the held-out episode when --scenario is given "
                                             "(a run uses its own).")] = "moderate",
    int8: Annotated[bool, typer.Option("--int8", help="Also write an int8 (dynamic quantization) model and "
                                                      "report its action agreement with fp32.")] = False,
    policy_version: Annotated[int | None, typer.Option(help="Monotone version that controllers use against "
                                                            "rollback \\[default: the export time in seconds]")]
    = None,
    holdout_decisions: Annotated[int, typer.Option(min=1, help="Decision steps of the held-out episode (every "
                                                               "light's observation at each step).")] = 60,
    min_int8_agreement: Annotated[float, typer.Option(min=0.0, max=1.0, help="Refuse an int8 model that agrees "
                                                                             "with fp32 on fewer actions.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of a freshly initialized actor.")] = 0,
) -> None:
    """Export the actor to ONNX (obs [B,34] float32, mask [B,8] bool → logits, action) with the observation
    schema, every light's phase table, the policy version and a self-test in its metadata.

    Parity against torch is checked on observations of a fresh SUMO episode the policy drives (logits within
    1e-4, identical actions); nothing is written when it fails."""
    from trainer.export import ExportRequest, export_policy

    request = ExportRequest(out=out, run=run, scenario=scenario, demand=demand, int8=int8,
                            policy_version=policy_version, holdout_decisions=holdout_decisions,
                            min_int8_agreement=min_int8_agreement, seed=seed)
    with err_console.status("exporting") as status:
        report = export_policy(request, progress=lambda text: status.update(text))
    table = Table(title=f"policy v{report.policy_version} · {report.scenario} · {report.lights} lights · "
                        f"{report.holdout} held-out observations")
    for column in ("model", "bytes", "max |Δ logit| vs torch", "actions identical to torch"):
        table.add_column(column, justify="right" if column != "model" else "left")
    table.add_row(str(report.fp32), f"{report.fp32_bytes:,}", f"{report.max_logit_error:.2e}",
                  f"{report.action_agreement:.2%}")
    if report.int8 is not None:
        table.add_row(str(report.int8), f"{report.int8_bytes:,}", f"{report.int8_max_logit_error:.2e}",
                      f"{report.int8_agreement:.2%}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(user_errors(export_command))
