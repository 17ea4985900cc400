"""`reled compare`: several runs side by side, grouped by algorithm/scenario/demand over seeds."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from edge_runtime.errors import RELEDError
from trainer.marl.config import HPOConfig
from trainer.marl.run_folder import read_config, read_summary
from trainer.stats import mean_std


@dataclass(frozen=True)
class GroupSummary:
    label: str
    runs: list[Path]
    seeds: list[int]
    last10: tuple[float, float]  # mean ± std over runs of each run's last-10 evaluation delay
    best: tuple[float, float]
    agent_steps: int
    wall_minutes: float


def group_runs(folders: list[Path]) -> dict[str, list[Path]]:
    """Runs that differ only by seed share a label (algo scenario/demand; RELED's non-default settings,
    so that an ablation is not averaged with the full method)."""
    groups: dict[str, list[Path]] = {}
    for folder in folders:
        if not folder.is_dir():
            raise RELEDError(f"{folder} is not a run folder")
        s = read_summary(folder)
        groups.setdefault(f"{s['algo']}{_variant(folder)} {s['scenario']}/{s['demand']}", []).append(folder)
    return groups


def _variant(folder: Path) -> str:
    """``[gate=False, ...]``: the [reled] settings of a RELED run that differ from the defaults."""
    hpo = read_config(folder).hpo
    changed = [f"{f.name}={getattr(hpo, f.name)}" for f in fields(HPOConfig)
               if f.name != "demos" and getattr(hpo, f.name) != f.default]
    return f"[{', '.join(changed)}]" if changed and read_config(folder).algo == "reled" else ""


def summarise_groups(groups: dict[str, list[Path]]) -> list[GroupSummary]:
    out = []
    for label, folders in groups.items():
        summaries = [read_summary(f) for f in folders]
        out.append(GroupSummary(
            label=label, runs=folders, seeds=[s["seed"] for s in summaries],
            last10=mean_std([s["last10_delay"] for s in summaries if s["last10_delay"] is not None]),
            best=mean_std([s["best_eval_delay"] for s in summaries if s["best_eval_delay"] is not None]),
            agent_steps=int(np.mean([s["agent_steps"] for s in summaries])),
            wall_minutes=float(np.mean([s["wall_seconds"] for s in summaries])) / 60))
    return out
