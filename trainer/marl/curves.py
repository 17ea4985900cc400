"""Learning curves of one run and the comparison of several (headless PNGs, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from trainer.marl.run_folder import (
    CURVES_FILE,
    EVALUATIONS_FILE,
    HPO_FILE,
    METRICS_FILE,
    RELED_CURVES_FILE,
    SED_FILE,
    CsvLog,
)
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


def hpo_curves(folder: Path) -> Path:
    """RELED's diagnostics beside the delay curve: per-agent weights and gaps G_E,k − G_A,k, the imitation
    share and the gate, and ε_j, D_j and B_j of the demonstrations in force at every SED pass."""
    metrics = CsvLog(folder / METRICS_FILE).read()
    evals = CsvLog(folder / EVALUATIONS_FILE).read()
    agents = CsvLog(folder / HPO_FILE).read()
    passes = [r for r in CsvLog(folder / SED_FILE).read() if r["adopted"] == "1"]
    steps = _column(metrics, "agent_steps")
    fig, axes = plt.subplots(2, 3, figsize=(17, 7.5), sharex=True)
    ax = axes[0, 0]
    ax.plot(steps, _column(metrics, "train_delay"), color="#bbbbbb", lw=1, label="training episodes")
    if evals:
        e_steps, _, e_delay = _eval_means(evals)
        ax.plot(e_steps, e_delay, "o-", color="#C44E52", ms=3, label="evaluation (greedy actions)")
        ax.set_ylim(0.8 * np.nanmin(e_delay), 2.5 * np.nanmin(e_delay))  # the first episodes run off the top
    ax.set_ylabel("average delay (s)")
    ax.legend(fontsize=8)
    for ax, column, label, mean in ((axes[0, 1], "weight", "imitation weight w_k", "hpo/w_mean"),
                                    (axes[0, 2], "gap", "G_E,k − G_A,k (reward per decision)", "hpo/gap_mean")):
        for name in sorted({r["agent"] for r in agents}):
            mine = [r for r in agents if r["agent"] == name]
            ax.plot(_column(mine, "agent_steps"), _column(mine, column), lw=0.8, alpha=0.5)
        ax.plot(steps, _column(metrics, mean), color="black", lw=2, label="mean over agents")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0, 2].axhline(0.0, color="grey", lw=0.8, ls=":")  # above: the expert is better, the gate opens
    axes[0, 2].set_yscale("symlog", linthresh=0.1)  # the first updates' gaps are 100 times the later ones
    ax = axes[1, 0]
    ax.plot(steps, _column(metrics, "loss/imitation_share"), color="#4C72B0", label="imitation share of the loss")
    ax.plot(steps, _column(metrics, "hpo/gate_open"), color="#55A868", label="agents whose expert is better")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share")
    ax.legend(fontsize=8)
    twin = ax.twinx()
    twin.plot(steps, _column(metrics, "hpo/d_mean") / _column(metrics, "hpo/sigma"), color="#8172B2", lw=1,
              ls="--", label="mean d_k / σ")
    twin.set_ylabel("d / σ")
    twin.legend(fontsize=8, loc="center right")
    _sed_pass_panels(axes[1, 1], axes[1, 2], passes, metrics)
    for a in axes[1]:
        a.set_xlabel("agent-steps")
    fig.suptitle(f"{folder.name}: RELED's hybrid objective")
    return save_figure(fig, folder / RELED_CURVES_FILE)


def _sed_pass_panels(left: plt.Axes, right: plt.Axes, passes: list[dict[str, str]],
                     metrics: list[dict[str, str]]) -> None:
    """D_j per subset (left), B_j per subset and the mean ε_j (right) of the demonstrations kept at each pass."""
    if not passes:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no SED pass yet", ha="center", va="center", transform=ax.transAxes)
        return
    at = {m["update"]: float(m["agent_steps"]) for m in metrics}
    for subset in sorted({r["subset"] for r in passes}, key=int):
        mine = [r for r in passes if r["subset"] == subset]
        x = [at.get(r["update"], np.nan) for r in mine]
        left.plot(x, _column(mine, "divergence"), "o-", ms=3, label=f"j={subset}")
        right.plot(x, _column(mine, "bound"), "o-", ms=3)
    left.set_ylabel("policy divergence D_j at SED passes")
    left.legend(fontsize=7, ncol=2)
    right.set_ylabel("bound B_j at SED passes")
    updates = list(dict.fromkeys(r["update"] for r in passes))
    twin = right.twinx()
    twin.plot([at.get(u, np.nan) for u in updates],
              [np.mean([float(r["epsilon"]) for r in passes if r["update"] == u]) for u in updates],
              "s--", color="black", ms=4, label="mean ε_j")
    twin.set_ylabel("ε_j (mean over subsets)")
    twin.legend(fontsize=8, loc="upper right")


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
