"""`reled sweep FILE.toml`: every combination of a sweep file, here or as Ray tasks, then their comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trainer.cli.common import console
from trainer.cli.options import default_note


def sweep_command(
    file: Annotated[Path, typer.Argument(help="Sweep file: \\[sweep] algos, scenarios, demands, seeds and the runs' "
                                              "settings; optional \\[env] and \\[timing] (docs/scale_out.md).")],
    out: Annotated[Path | None, typer.Option(help="Results folder: runs/, heuristics/, log.jsonl, compare.png "
                                                  + default_note("sweeps/FILE-NAME"))] = None,
    ray_address: Annotated[str | None, typer.Option(
        help="Run the steps as Ray tasks (a run asks for its workers' CPUs): local (a private Ray on this machine), "
             "auto (the cluster this machine joined) or HOST:PORT of a cluster's head; OUT must be on a file "
             "system every node shares " + default_note("no Ray: one step after another here"))] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the commands, run nothing.")] = False,
) -> None:
    """Train every combination of a sweep file's algorithms, scenarios, demands and seeds, then compare them.

    Each step is a `reled` command (reference lines with `reled eval`, RELED's demonstrations, `reled train`)
    logged to OUT/log.jsonl; a finished step is skipped and a stopped run resumed, so a sweep can be run again
    until it is complete. Ends with `reled compare`'s table of the finished runs (OUT/compare.png, compare.json).
    """
    from edge_runtime.errors import RELEDError
    from trainer.cli.train import compare_runs
    from trainer.ray_session import check_address, missing_ray, ray_installed
    from trainer.sweep.execute import RAY_SWEEP, Log, run_here, run_on_ray
    from trainer.sweep.spec import load_sweep
    from trainer.sweep.steps import Planner

    if ray_address is not None:  # before anything is written
        if not ray_installed():
            raise missing_ray(RAY_SWEEP)
        check_address(ray_address)
    sweep = load_sweep(file)
    spec = sweep.spec
    out = (out or Path("sweeps") / file.stem).resolve()
    config = sweep.write_config(out) if not dry_run else None
    planner = Planner(out, workers=spec.workers, eval_every=spec.eval_every, eval_episodes=spec.eval_episodes,
                      sed_every=spec.sed_every, heuristics_episodes=spec.heuristics_episodes, root=Path.cwd(),
                      config=config)
    runs = spec.runs()
    for run in runs:
        planner.add_run(run)
    steps = list(planner.steps.values())
    console.print(f"sweep {file}: {len(runs)} runs, {len(steps)} steps → {out}", highlight=False)
    if dry_run:
        for step in steps:
            console.print("+ reled " + " ".join(step.arguments()) + (" (done)" if step.done() else ""),
                          markup=False, highlight=False)
        return
    log = Log(out)
    if ray_address is None:
        run_here(steps, Path.cwd(), log)
    else:
        run_on_ray(steps, Path.cwd(), log, ray_address)
    finished = [out / "runs" / run.key for run in runs if planner.steps[run.key].done()]
    if finished:
        compare_runs(finished, out / "compare.png", out / "compare.json")
    if log.failed:
        raise RELEDError(f"{len(log.failed)} step(s) of the sweep failed ({', '.join(log.failed)}): see "
                         f"{out / 'log.jsonl'} and the output above; run the sweep again to retry them")
