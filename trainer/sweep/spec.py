"""A sweep file: what varies (algorithms × scenarios × demands × seeds) and what every run shares.

    [sweep]
    algos = ["ippo", "mappo"]
    scenarios = ["grid2x2", "cologne1"]
    demands = ["moderate"]
    seeds = [0, 1, 2]
    steps = 28800
    workers = 2               # SUMO workers per run, and the CPUs its Ray task asks for

    [env]                     # optional, as in `reled train --config`: reward, episode_seconds, ...
    episode_seconds = 1800

    [timing]                  # optional: the shield's timing for training and reference lines alike

Every key, and what it defaults to, is in ``SweepSpec``; unknown keys and wrong types are refused
naming the file, and every run's settings are checked before the first one starts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_write_text
from edge_runtime.settings import build_section, read_sections, section_values
from trainer.env import EnvConfig
from trainer.marl.config import ALGOS, TRAIN_ENV_KEYS, HPOConfig, TrainConfig, load_train_config
from trainer.scenarios import DecisionTiming, get_scenario
from trainer.sweep.runs import Run

CONFIG_FILE = "sweep-config.toml"  # the file's [env] and [timing], as every run's --config


@dataclass(frozen=True)
class SweepSpec:
    """The `[sweep]` section."""

    algos: tuple[str, ...] = ("ippo",)
    scenarios: tuple[str, ...] = (TrainConfig.scenario,)
    demands: tuple[str, ...] = (TrainConfig.demand,)
    seeds: tuple[int, ...] = (TrainConfig.seed,)
    steps: int = TrainConfig.steps
    workers: int = TrainConfig.workers
    eval_every: int = TrainConfig.eval_every
    eval_episodes: int = TrainConfig.eval_episodes
    heuristics_episodes: int = 3  # `reled eval` of fixed, greedy and max-pressure per scenario and demand; 0: none
    sed_every: int = HPOConfig.sed_every  # RELED runs: updates between SED passes
    reled_flags: tuple[str, ...] = ()  # more `reled train` flags for the RELED runs (e.g. "--no-sed-llm")

    def __post_init__(self) -> None:  # a ValueError is named with the file and section by the settings loader
        for name in ("algos", "scenarios", "demands", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: list at least one")
        unknown = sorted(set(self.algos) - set(ALGOS))
        if unknown:
            raise ValueError(f"algos {unknown} unknown: choose from {', '.join(ALGOS)}")
        if self.heuristics_episodes < 0:
            raise ValueError("heuristics_episodes must be >= 0")

    def runs(self) -> list[Run]:
        """Every combination, algorithms innermost (so a seed's runs finish together)."""
        return [Run("sweep", scenario, demand, algo, seed, self.steps,
                    flags=self.reled_flags if algo == "reled" else ())
                for scenario, demand, seed, algo in itertools.product(self.scenarios, self.demands, self.seeds,
                                                                      self.algos)]


@dataclass(frozen=True)
class Sweep:
    spec: SweepSpec
    env: dict[str, Any]  # the [env] and [timing] sections every run (and reference line) is given
    timing: dict[str, Any]

    def write_config(self, out: Path) -> Path | None:
        """OUT/sweep-config.toml with the [env] and [timing] sections (None when the file has neither)."""
        if not self.env and not self.timing:
            return None
        path = out / CONFIG_FILE
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, tomli_w.dumps({k: v for k, v in (("env", self.env), ("timing", self.timing)) if v}))
        return path


def load_sweep(path: Path) -> Sweep:
    """The sweep in ``path``, every run's settings checked (scenarios, demands, [env], [timing])."""
    source = str(path)
    sections = read_sections(path, ("sweep", "env", "timing"))
    spec = build_section(source, "sweep", sections.get("sweep", {}), SweepSpec)
    env = section_values(source, "env", sections.get("env", {}), EnvConfig, allowed=TRAIN_ENV_KEYS)
    timing = section_values(source, "timing", sections.get("timing", {}), DecisionTiming)
    try:
        for scenario, demand in itertools.product(spec.scenarios, spec.demands):
            get_scenario(scenario).demand(demand)
        for run in spec.runs()[:len(spec.algos)]:  # one run per algorithm checks the settings they all share
            load_train_config(None, train={"algo": run.algo, "scenario": run.scenario, "demand": run.demand,
                                           "steps": spec.steps, "workers": spec.workers,
                                           "eval_every": spec.eval_every, "eval_episodes": spec.eval_episodes},
                              env=env, timing=timing)
    except RELEDError as exc:
        raise RELEDError(f"{source}: [sweep] {exc}") from None
    return Sweep(spec, sections.get("env", {}), sections.get("timing", {}))
