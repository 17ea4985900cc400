"""Tables and JSON reports of evaluation results; the summary comes computed (``summarise_metrics``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from edge_runtime.fileio import atomic_write_text
from trainer.env import EnvConfig
from trainer.evaluate import EpisodeResult, Summary
from trainer.scenarios import Scenario
from trainer.sim.metrics import METRIC_LABELS


def episode_tables(results: list[EpisodeResult]) -> list[Table]:
    tables = []
    for name in dict.fromkeys(r.controller for r in results):
        table = Table(title=f"{name}: per seed")
        table.add_column("seed", justify="right")
        for label in METRIC_LABELS.values():
            table.add_column(label, justify="right")
        table.add_column("wall (s)", justify="right")
        for r in (r for r in results if r.controller == name):
            m = r.metrics.as_dict()
            table.add_row(str(r.seed), *(_fmt(m[key]) for key in METRIC_LABELS), f"{r.wall_seconds:.1f}")
        tables.append(table)
    return tables


def summary_table(summary: Summary, title: str) -> Table:
    table = Table(title=title)
    table.add_column("controller")
    for key in summary.metrics:
        table.add_column(METRIC_LABELS[key], justify="right")
    for name in summary.controllers:
        table.add_row(name, *(f"{stats[name][0]:.1f} ± {stats[name][1]:.1f}" for stats in summary.metrics.values()))
    return table


def write_eval_json(path: Path, scenario: Scenario, demand: str, config: EnvConfig, results: list[EpisodeResult],
                    summary: Summary, policies: dict[str, Any] | None = None) -> None:
    """Every episode and the summary; ``policies`` (label -> a dataclass: checkpoint, trained_on, zero_shot)
    says where each trained policy came from, so a zero-shot row is marked in the file as in the table."""
    payload = {
        "scenario": scenario.name, "demand": demand,
        "vehicles_per_hour": scenario.demand(demand).vehicles_per_hour,
        "timing": dataclasses.asdict(config.timing or scenario.timing),
        "episodes": [{"controller": r.controller, "seed": r.seed, "wall_seconds": r.wall_seconds,
                      **r.metrics.as_dict()} for r in results],
        "summary": {key: {name: {"mean": m, "std": s} for name, (m, s) in stats.items()}
                    for key, stats in summary.metrics.items()},
        "policies": {name: dataclasses.asdict(origin) for name, origin in (policies or {}).items()},
    }
    atomic_write_text(path, json.dumps(payload, indent=2))


def _fmt(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
