"""`reled export`: a trained (or fresh) actor to an ONNX policy file for the intersection controller."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trainer.cli.common import console, err_console
from trainer.cli.options import Flag, Given, OptionGroup

EXPORT = OptionGroup(
    "trainer.export:ExportRequest",
    Flag("run", Path, "A run folder (runs/NAME: best.pt, else latest.pt) or a checkpoint file."),
    Flag("scenario", str, "Without --run: export a freshly initialized actor for this scenario (to test the "
                          "deployment path)."),
    Flag("demand", str, "Demand of the held-out episode when --scenario is given (a run uses its own)."),
    Flag("int8", bool, "Also write an int8 (dynamic quantization) model and report its action agreement with fp32.",
         "--int8"),
    Flag("policy_version", int, "Monotone version that controllers use against rollback",
         none="the export time in seconds"),
    Flag("holdout_decisions", int, "Decision steps of the held-out episode (every light's observation at each "
                                   "step).", min=1),
    Flag("min_int8_agreement", float, "Refuse an int8 model that agrees with fp32 on fewer actions.", min=0.0,
         max=1.0),
    Flag("seed", int, "Seed of a freshly initialized actor."),
)


def export_command(
    out: Annotated[Path, typer.Option(help="The ONNX file to write (policy.onnx); --int8 adds <stem>.int8.onnx.")],
    request: Given = EXPORT,
) -> None:
    """Export the actor to ONNX (obs [B,34] float32, mask [B,8] bool → logits, action) with the observation
    schema, every light's phase table, the policy version and a self-test in its metadata.

    Parity against torch is checked on observations of a fresh SUMO episode the policy drives (logits within
    1e-4, identical actions); nothing is written when it fails."""
    from trainer.export import ExportRequest, export_policy

    with err_console.status("exporting") as status:
        report = export_policy(ExportRequest(out=out, **request), progress=lambda text: status.update(text))
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
