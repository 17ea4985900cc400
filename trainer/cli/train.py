"""`reled train` and `reled compare`: IPPO / MAPPO training runs and their comparison."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from trainer.cli.common import console, err_console, progress_bar
from trainer.cli.options import ENV, Flag, Given, OptionGroup, default_note

TRAIN = OptionGroup(
    "trainer.marl.config:TrainConfig",
    Flag("algo", str, "ippo (local critic), mappo (centralized critic) or reled (IPPO plus imitation of SED's "
                      "demonstrations, weighted per agent)"),
    Flag("scenario", str, "Scenario name or folder"),
    Flag("demand", str, "Demand regime"),
    Flag("steps", int, "Agent-steps to train for (one intersection's decision each)"),
    Flag("workers", int, "SUMO workers (processes, or Ray actors)"),
    Flag("backend_workers", str, "Where the SUMO workers run: local (processes on this machine) or ray (one Ray "
                                 "actor each, here or on a cluster; pip install 'reled\\[ray]')"),
    Flag("ray_address", str, "With --backend-workers ray: local (a private Ray on this machine), auto (the "
                             "cluster this machine joined with `ray start`) or HOST:PORT of a cluster's head"),
    Flag("seed", int, "Seed of the networks, sampling and SUMO"),
    Flag("episodes_per_update", int, "Episodes per PPO update"),
    Flag("eval_every", int, "Updates between evaluations"),
    Flag("eval_episodes", int, "Greedy episodes per evaluation"),
    Flag("overlap", bool, "Collect the next update's episodes while the learner updates (each batch is then one "
                          "update behind; PPO's ratio uses the weights that played): the learner's time is hidden"),
)
HPO = OptionGroup(
    "trainer.marl.config:HPOConfig",
    Flag("demos", str, "reled: demonstration store (`reled demos generate`) for the run's scenario, demand and "
                       "timing", none="generate one at the start with SED's verified mode"),
    Flag("expert_weight", str, "reled: adaptive (w_max·(1−exp(−d/σ))·sigmoid(gap)), fixed:X or none"),
    Flag("w_max", float, "reled: largest imitation weight", min=0),
    Flag("gate_scale", float, "reled: s of the gate, relative to |G_A| (0.1: a 10% better expert gives 0.73)",
         min=1e-6),
    Flag("gate", bool, "reled: close the weight when the expert's return is below the agent's"),
    Flag("dtw", bool, "reled: scale the weight by the DTW distance to the expert (off: w_max·gate)"),
    Flag("sed", bool, "reled: bound-guided demonstrations and SED passes (off: round-0 demonstrations with "
                      "λ = 0, no passes)"),
    Flag("sed_every", int, "reled: updates between SED passes (re-score, refine, replace); 0 = never", min=0),
    Flag("sed_llm", bool, "reled: SED with the embedded LLM (off: the classical tools only)"),
)
# What --resume refuses (the run's own settings), in the order its error names them.
RESUME_FIXED = ("algo", "scenario", "demand", "seed", "config", "name", "backend", "reward", "episode_seconds",
                "episodes_per_update", "eval_every", "eval_episodes", "overlap", "demos", "expert_weight", "w_max",
                "gate_scale", "gate", "dtw", "sed", "sed_every", "sed_llm")


def train_command(
    train: Given = TRAIN,
    hpo: Given = HPO,
    env: Given = ENV,
    config: Annotated[Path | None, typer.Option(help="TOML with \\[train], \\[ppo], \\[env], \\[timing]; flags win. "
                                                     "See docs/training.md for every key.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name " + default_note("ALGO-SCENARIO-DEMAND-sSEED"))]
    = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    resume: Annotated[Path | None, typer.Option(help="Continue runs/NAME from latest.pt exactly; only --steps, "
                                                     "--workers, --backend-workers and --ray-address may change."
                                                )] = None,
    show_config: Annotated[bool, typer.Option(help="Print the resolved configuration (every default, as TOML) "
                                                   "and exit.")] = False,
) -> None:
    """Train a parameter-shared IPPO, MAPPO or RELED policy with parallel SUMO workers.

    Writes runs/NAME/: config.toml, latest.pt, best.pt (best evaluation delay), metrics.csv,
    evaluations.csv, summary.json, tb/ (TensorBoard) and curves.png. The headline figure is the
    mean delay of the last 10 evaluation episodes (the final policy's), not the best episode.
    RELED runs also keep demos-vN/ (the demonstrations in force), hpo.csv (every agent's weight),
    sed.csv (every SED pass) and reled.png.
    """
    from edge_runtime.errors import RELEDError
    from trainer.marl.config import load_train_config
    from trainer.marl.training import TrainingRun

    if resume is not None:
        values = {**train, **hpo, **env, "config": config, "name": name}
        given = [f"--{key.replace('_', '-')}" for key in RESUME_FIXED if values.get(key) is not None]
        if given:
            raise RELEDError(f"--resume continues the run's own settings; drop {', '.join(given)} "
                             "(only --steps, --workers, --backend-workers and --ray-address may change)")
        run = TrainingRun.resume(resume, steps=train.get("steps"), workers=train.get("workers"),
                                 backend_workers=train.get("backend_workers"), ray_address=train.get("ray_address"))
    else:
        cfg = load_train_config(config, train=train, hpo=hpo, env=env)
        if show_config:
            import tomli_w

            console.print(tomli_w.dumps(cfg.as_dict()), markup=False, highlight=False)
            return
        folder = runs_dir / (name or f"{cfg.algo}-{cfg.scenario}-{cfg.demand}-s{cfg.seed}")
        run = TrainingRun.create(folder, cfg)
    _train_with_progress(run)


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    """`kill` and systemd stop a run the way Ctrl-C does: workers closed, latest.pt kept."""
    raise KeyboardInterrupt


def _train_with_progress(run: Any) -> None:
    from trainer.marl.curves import hpo_curves, learning_curves

    cfg, progress = run.config, run.progress
    where = f" (Ray actors, --ray-address {cfg.ray_address})" if cfg.backend_workers == "ray" else ""
    console.print(f"[bold]{cfg.algo}[/] on {cfg.scenario}/{cfg.demand}, seed {cfg.seed}: {len(run.agents)} "
                  f"agents, {cfg.steps:,} agent-steps, {cfg.workers} worker(s){where} → {run.folder}")
    latest: dict[str, float] = {}
    with progress_bar(counts=True) as bar:
        task = bar.add_task("training", total=cfg.steps, completed=progress.agent_steps)

        def on_update(row: dict[str, Any]) -> None:
            latest["train"] = row["train_delay"]
            if row["eval_delay"] is not None:
                latest["eval"] = row["eval_delay"]
                learning_curves(run.folder)
                if cfg.algo == "reled":
                    hpo_curves(run.folder)
                if not err_console.is_terminal:
                    console.print(f"update {row['update']}: {row['agent_steps']:,} agent-steps, train delay "
                                  f"{row['train_delay']:.1f} s, eval delay {row['eval_delay']:.1f} s, "
                                  f"{row['wall_seconds']:.0f} s")
            eval_text = f", eval {latest['eval']:.1f}" if "eval" in latest else ""
            bar.update(task, completed=min(row["agent_steps"], cfg.steps),
                       description=f"update {row['update']} · delay {latest['train']:.1f} s{eval_text}")

        previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
        try:
            run.train(on_update)
        except KeyboardInterrupt:
            err_console.print(f"[yellow]interrupted[/]: latest.pt holds the last finished update; continue with "
                              f"`reled train --resume {run.folder}`")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
    from trainer.marl.run_folder import summary

    s = summary(cfg, run.progress)
    table = Table(title=f"{run.folder.name}")
    for col in ("agent-steps", "updates", "last-10 eval delay (s)", "best eval delay (s)", "wall-clock"):
        table.add_column(col)
    std = f" ± {s['last10_delay_std']:.1f}" if s["last10_delay_std"] is not None else ""
    table.add_row(f"{s['agent_steps']:,}", str(s["updates"]), f"{s['last10_delay']:.1f}{std}",
                  f"{s['best_eval_delay']:.1f} (update {s['best_update']})", f"{s['wall_seconds'] / 60:.1f} min")
    console.print(table)
    console.print(f"wrote {run.folder}/ (best.pt, latest.pt, metrics.csv, curves.png, tb/)")


def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (runs/NAME); seeds of one setting are grouped.")],
    plot: Annotated[Path, typer.Option(help="PNG of evaluation delay vs agent-steps, mean ± std.")]
    = Path("compare.png"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the table as JSON.")] = None,
) -> None:
    """Compare runs: one table (last-10 and best evaluation delay, mean ± std over seeds) and one plot."""
    compare_runs(runs, plot, json_out)


def compare_runs(runs: list[Path], plot: Path, json_out: Path | None) -> None:
    """The table, the plot and the JSON of `reled compare` (`reled sweep` ends with them too)."""
    import json

    from edge_runtime.fileio import atomic_write_text
    from trainer.marl.compare import group_runs, summarise_groups
    from trainer.marl.curves import compare_plot

    groups = group_runs(runs)
    rows = summarise_groups(groups)
    table = Table(title="runs: evaluation average delay (s), mean ± std over seeds")
    for col in ("setting", "seeds", "last-10 delay", "best delay", "agent-steps", "wall-clock"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.label, ",".join(map(str, r.seeds)), f"{r.last10[0]:.1f} ± {r.last10[1]:.1f}",
                      f"{r.best[0]:.1f} ± {r.best[1]:.1f}", f"{r.agent_steps:,}", f"{r.wall_minutes:.1f} min")
    console.print(table)
    compare_plot(groups, plot, "evaluation delay during training")
    console.print(f"wrote {plot}")
    if json_out:
        atomic_write_text(json_out, json.dumps([{"setting": r.label, "runs": [str(p) for p in r.runs],
                                                 "seeds": r.seeds, "last10_mean": r.last10[0],
                                                 "last10_std": r.last10[1], "best_mean": r.best[0],
                                                 "best_std": r.best[1], "agent_steps": r.agent_steps,
                                                 "wall_minutes": r.wall_minutes} for r in rows], indent=2) + "\n")
        console.print(f"wrote {json_out}")
