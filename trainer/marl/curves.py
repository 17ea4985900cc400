"""Learning curves of one run and the comparison of several (headless PNGs, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from trainer.marl.run_folder import CURVES_FILE, EVALUATIONS_FILE, METRICS_FILE, CsvLog
from trainer.plots import save_figure


def _column(rows: list[dict[str, str]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows])


def _eval_means(rows: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per evaluation (one update): agent-steps, wall-clock and mean delay over its episodes."""
    updates = sorted({int(r["update"]) for r in rows})
    steps, wall, delay = [], [], []
    for u in updates:
        group = [r for r in rows if int(r["update"]) == u]
        steps.append(float(group[0]["agent_steps"]))
        wall.append(float(group[0]["wall_seconds"]))
        delay.append(float(np.mean([float(r["avg_delay"]) for r in group])))
    return np.array(steps), np.array(wall), np.array(delay)


def learning_curves(folder: Path) -> Path:
    """Average delay and reward against agent-steps and against wall-clock time."""
    metrics = CsvLog(folder / METRICS_FILE).read()
    evals = CsvLog(folder / EVALUATIONS_FILE).read()
    steps, wall = _column(metrics, "agent_steps"), _column(metrics, "wall_seconds") / 60
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for col, x in enumerate((steps, wall)):
        axes[0, col].plot(x, _column(metrics, "train_delay"), color="#bbbbbb", lw=1, label="training episodes")
        if evals:
            e_steps, e_wall, e_delay = _eval_means(evals)
            axes[0, col].plot(e_steps if col == 0 else e_wall / 60, e_delay, "o-", color="#C44E52", ms=3,
                              label="evaluation (greedy actions)")
        axes[1, col].plot(x, _column(metrics, "train_reward"), color="#4C72B0", lw=1)
        axes[1, col].set_xlabel("agent-steps" if col == 0 else "wall-clock (min)")
    axes[0, 0].set_yscale("log")  # the first episodes are 5-10x worse than the plateau
    axes[0, 0].set_ylabel("average delay per vehicle (s, log)")
    axes[1, 0].set_ylabel("episode reward per agent")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(folder.name)
    return save_figure(fig, folder / CURVES_FILE)


def compare_plot(groups: dict[str, list[Path]], path: Path, title: str,
                 references: dict[str, float] | None = None) -> Path:
    """Evaluation delay vs agent-steps, mean ± std over the runs (seeds) of each group; ``references``
    (e.g. heuristics' delays) are drawn as dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, folders in groups.items():
        curves = [_eval_means(CsvLog(f / EVALUATIONS_FILE).read()) for f in folders]
        curves = [c for c in curves if len(c[0])]
        if not curves:
            continue
        grid = np.linspace(max(c[0][0] for c in curves), min(c[0][-1] for c in curves), 60)
        values = np.stack([np.interp(grid, c[0], c[2]) for c in curves])
        mean, std = values.mean(0), values.std(0)
        line, = ax.plot(grid, mean, label=f"{label} (n={len(curves)})")
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for k, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{k + len(groups)}", label=f"{label} ({value:.1f} s)")
    if references:  # zoom on the comparison; the first, much worse evaluations run off the top
        low, high = ax.get_ylim()
        ax.set_ylim(low, min(high, 1.6 * max(references.values())))
    ax.set_xlabel("agent-steps")
    ax.set_ylabel("evaluation average delay (s)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
