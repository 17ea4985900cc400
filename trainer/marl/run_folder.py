"""A run folder: resolved config, metrics.csv, evaluations.csv, summary.json, checkpoints, curves.

Every file is either appended a whole line at a time or replaced atomically, so a run killed at
any point leaves a folder that `--resume`, `reled compare` and a spreadsheet can all read.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_write_text
from trainer.marl.config import TrainConfig, load_train_config
from trainer.stats import mean_std

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.csv"
EVALUATIONS_FILE = "evaluations.csv"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
RELED_CURVES_FILE = "reled.png"  # RELED: weights, imitation share, gate, D_j beside the delay
LATEST = "latest.pt"
BEST = "best.pt"
EVAL_COLUMNS = ["update", "agent_steps", "wall_seconds", "final", "seed", "avg_delay", "avg_travel_time",
                "avg_waiting_time", "throughput", "teleports"]
HPO_FILE = "hpo.csv"  # RELED: every agent's imitation weight and what it came from, per update
HPO_COLUMNS = ["update", "agent_steps", "agent", "weight", "distance", "expert_return", "agent_return", "gap"]
SED_FILE = "sed.csv"  # RELED: every SED pass, per subset, the kept and the fresh demonstration's scores
SED_COLUMNS = ["update", "source", "adopted", "subset", "ret", "epsilon", "divergence", "bound", "score"]
LAST_N = 10  # the final-policy figure: mean delay of the last 10 evaluation episodes


@dataclass
class RunProgress:
    """Counters that make a resumed run continue exactly where it stopped."""

    updates: int = 0
    agent_steps: int = 0
    episodes: int = 0  # training episodes played (their index seeds the next ones)
    eval_episodes: int = 0  # periodic evaluation episodes played (their index sets their SUMO seed)
    wall_seconds: float = 0.0
    best_delay: float = math.inf
    best_update: int = -1
    finished: bool = False
    sed_seconds: float = 0.0  # RELED: wall-clock spent making and renewing demonstrations (in wall_seconds)
    demos_version: int = 0  # RELED: the demos-vN folder in force
    sed_passes: int = 0
    greedy_agent_return: list[float] = field(default_factory=list)  # per agent, the latest periodic evaluation's
    history: list[float] = field(default_factory=list)  # eval-episode delays, for the last-10 figure


def write_config(folder: Path, config: TrainConfig) -> None:
    atomic_write_text(folder / CONFIG_FILE, tomli_w.dumps(config.as_dict()))


def read_config(folder: Path) -> TrainConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise RELEDError(f"{folder} is not a training run (no {CONFIG_FILE}); give a folder made by `reled train`")
    return load_train_config(path, train={})


class CsvLog:
    """Append-only CSV with a header fixed by the first row; resuming drops rows past the checkpoint."""

    def __init__(self, path: Path, columns: list[str] | None = None):
        self.path = path
        self.columns = columns

    def truncate_after(self, update: int) -> None:
        rows = self.read()
        if rows:
            self._rewrite(list(rows[0]), [r for r in rows if int(r["update"]) <= update])

    def widen(self, columns: list[str]) -> None:
        """Add the columns a written header lacks (a run's first street update); earlier rows leave them empty."""
        if self.columns is None:
            return  # no header yet: the first row sets it
        missing = [c for c in columns if c not in self.columns]
        if missing:
            self._rewrite([*self.columns, *missing], self.read())

    def _rewrite(self, columns: list[str], rows: list[dict[str, str]]) -> None:
        self.columns = columns
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())

    def append(self, row: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = list(row)
        new = not self.path.exists()
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in self.columns})

    def read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as fh:
            return list(csv.DictReader(fh))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def summary(config: TrainConfig, progress: RunProgress) -> dict[str, Any]:
    last = progress.history[-LAST_N:]
    mean, std = mean_std(last)
    return {
        "algo": config.algo, "scenario": config.scenario, "demand": config.demand, "seed": config.seed,
        "agent_steps": progress.agent_steps, "updates": progress.updates, "wall_seconds": progress.wall_seconds,
        "finished": progress.finished,
        "last10_delay": mean if last else None,
        "last10_delay_std": std if len(last) > 1 else None,
        "last10_episodes": len(last),
        "best_eval_delay": progress.best_delay if math.isfinite(progress.best_delay) else None,
        "best_update": progress.best_update,
        **({"sed_seconds": progress.sed_seconds, "sed_passes": progress.sed_passes,
            "demos_version": progress.demos_version} if config.algo == "reled" else {}),
    }


def write_summary(folder: Path, config: TrainConfig, progress: RunProgress) -> None:
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(summary(config, progress), indent=2) + "\n")


def read_summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY_FILE
    if not path.is_file():
        raise RELEDError(f"{folder} has no {SUMMARY_FILE}: is it a run folder made by `reled train`?")
    return json.loads(path.read_text())

