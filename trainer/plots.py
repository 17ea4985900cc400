"""Charts people would rather look at than read (headless, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from edge_runtime.fileio import atomic_path


def bar_chart(summary: dict[str, tuple[float, float]], ylabel: str, title: str, path: Path) -> Path:
    """Bars of mean ± std per controller."""
    names = list(summary)
    means = [summary[n][0] for n in names]
    stds = [summary[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    bars = ax.bar(names, means, yerr=stds, capsize=4, color="#4C72B0", label="this run (mean ± std)")
    ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=3)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.margins(y=0.15)
    return save_figure(fig, path, dpi=120)


def save_figure(fig: plt.Figure, path: Path, dpi: int = 110) -> Path:
    """Lay out, write the PNG atomically, free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
