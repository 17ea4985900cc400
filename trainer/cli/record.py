"""`reled record`: what each light's detectors saw in a SUMO run, as the recordings controllers replay.

It is a trainer command, not a `reled-edge` one, because it runs SUMO; the files it writes are all a controller
needs (`reled-edge install --recording`, `reled-edge fleet up --replay --recordings DIR`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trainer.cli.common import console, err_console
from trainer.cli.options import DEMAND, default_note


def record_command(
    scenario: Annotated[str, typer.Option(help="Scenario name (see `reled scenarios`) or folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the recordings: one LIGHT.npz per light, so each device of "
                                           "a fleet takes its light's.")],
    controller: Annotated[str, typer.Option(help="Who drives the signals meanwhile: fixed (the net's programs), "
                                                 "greedy, max-pressure or random.")] = "max-pressure",
    light: Annotated[list[str] | None, typer.Option(help="Record only this light (repeatable) "
                                                         + default_note("every light"))] = None,
    seconds: Annotated[float | None, typer.Option(min=1, help="Simulated seconds to record "
                                                              + default_note("the scenario's begin..end"))] = None,
    seed: Annotated[int, typer.Option(help="SUMO seed.")] = 0,
    demand: str = DEMAND,
    config: Annotated[Path | None, typer.Option(help="TOML file with \\[env] and \\[timing] settings (the decision "
                                                     "interval is the recording's step).")] = None,
) -> None:
    """Record every light's (or --light's) per-phase detector readings (queued, approaching, longest wait) at each
    decision of one SUMO episode: the replay sensor's input, as the environment observed it."""
    from trainer.config import load_env_config
    from trainer.record import record

    env_config = load_env_config(config, scenario=scenario, demand=demand, episode_seconds=seconds)
    with err_console.status(f"recording {scenario} ({controller}, seed {seed})"):
        written = record(env_config, controller, seed, list(light or []), out)
    for recording in written:
        console.print(f"{recording.light}: {recording.decisions} readings → {recording.path}", highlight=False,
                      soft_wrap=True)
