"""SED figures: the subsets on the network map, and delay and bound per refinement round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.plots import plt, save_figure
from trainer.sed.clusters import RoadGraph, Subset
from trainer.sim.net import read_net


def subsets_map(net_file: Path, graph: RoadGraph, subsets: Sequence[Subset], title: str, path: Path) -> Path:
    """Roads in grey, each controlled light as a dot in its subset's colour, neighbour links dashed."""
    net = read_net(net_file)
    fig, ax = plt.subplots(figsize=(8, 8))
    for edge in net.getEdges():
        xs, ys = zip(*edge.getShape(), strict=True)
        ax.plot(xs, ys, color="#BBBBBB", linewidth=0.8, zorder=1)
    colours = plt.get_cmap("tab10")
    for (a, b), _metres in graph.distance.items():
        (xa, ya), (xb, yb) = graph.position[a], graph.position[b]
        ax.plot([xa, xb], [ya, yb], color="#555555", linewidth=0.6, linestyle=":", zorder=2)
    for subset in subsets:
        colour = colours(subset.index % 10)
        xs = [graph.position[tls][0] for tls in subset.lights]
        ys = [graph.position[tls][1] for tls in subset.lights]
        ax.scatter(xs, ys, s=120, color=colour, edgecolor="black", zorder=3, label=f"{subset.name} "
                   f"({len(subset.lights)} lights)")
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            ax.annotate(f"{subset.name}/I{k + 1}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def rounds_plot(manifest: dict[str, Any], path: Path) -> Path:
    """Average delay and mean B_j of every demonstration, per round, beside the baselines."""
    rounds = manifest["rounds"]
    fig, (ax_delay, ax_bound) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rounds:
        for cand in r["candidates"]:
            ax_delay.scatter(r["round"], cand["avg_delay"], color="#4C72B0", alpha=0.5, s=20)
            ax_bound.scatter(r["round"], cand["mean_bound"], color="#C44E52", alpha=0.5, s=20)
    xs = [r["round"] for r in rounds]
    ax_delay.plot(xs, [r["best_avg_delay"] for r in rounds], "-o", color="#4C72B0", label="best demonstration")
    ax_bound.plot(xs, [r["best_mean_bound"] for r in rounds], "-o", color="#C44E52",
                  label="best demonstration")
    styles = {"fixed": ("#555555", "--"), "max-pressure": ("#55A868", ":")}
    for name, metrics in manifest.get("baselines", {}).items():
        colour, style = styles.get(name, ("#8172B2", "-."))
        ax_delay.axhline(metrics["avg_delay"], color=colour, linestyle=style, label=name)
    ax_delay.set_xlabel("refinement round")
    ax_delay.set_ylabel("average delay per vehicle (s)")
    ax_delay.set_title("demonstration delay (dots: candidates)")
    ax_delay.legend(fontsize=8)
    ax_bound.set_xlabel("refinement round")
    ax_bound.set_ylabel("mean B_j over subsets")
    ax_bound.set_title("non-stationarity bound")
    ax_bound.legend(fontsize=8)
    for ax in (ax_delay, ax_bound):
        ax.set_xticks(xs)
    fig.suptitle(f"SED on {manifest['scenario']} ({manifest['demand']}), {manifest['mode']} mode, "
                 f"{manifest['model']['backend']}", fontsize=10)
    return save_figure(fig, path)
