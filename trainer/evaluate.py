"""Run controllers over seeded episodes and summarise the metrics (what `reled eval` does)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trainer.controllers import Controller
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.rollout import play_episode
from trainer.scenarios import Scenario
from trainer.sim.metrics import EpisodeMetrics
from trainer.stats import mean_std

# What `reled eval` summarises over seeds (its table, its JSON's "summary").
SUMMARY_METRICS = ("avg_delay", "avg_travel_time", "avg_waiting_time", "throughput", "teleports")
# Called after every decision with (controller name, seed, episode progress in [0, 1]).
ProgressHook = Callable[[str, int, float], None]


@dataclass(frozen=True)
class EpisodeResult:
    controller: str
    seed: int
    metrics: EpisodeMetrics
    wall_seconds: float


def run_episode(env: TrafficSignalEnv, controller: Controller, seed: int,
                on_step: Callable[[float], None] | None = None) -> EpisodeMetrics:
    """One full episode; returns SUMO's trip metrics."""
    play_episode(env, controller, seed, on_step=on_step)
    assert env.last_metrics is not None
    return env.last_metrics


@contextlib.contextmanager
def controller_env(scenario: Scenario, controller: Controller, config: EnvConfig) -> Iterator[TrafficSignalEnv]:
    """An environment set up the way ``controller`` needs it, closed afterwards."""
    env = TrafficSignalEnv(config, resolved=scenario, fixed_time=not controller.drives_signals,
                           with_pressure=controller.needs_pressure, with_inflow=controller.needs_inflow,
                           snapshots=controller.needs_snapshots, collect_metrics=True)
    try:
        controller.attach(env)
        yield env
    finally:
        controller.close()
        env.close()


def evaluate(scenario: Scenario, controllers: list[Controller], seeds: list[int], config: EnvConfig,
             progress: ProgressHook | None = None) -> list[EpisodeResult]:
    """Every controller over every seed (build controllers first, so bad names fail before SUMO runs)."""
    results = []
    for controller in controllers:
        with controller_env(scenario, controller, config) as env:
            for seed in seeds:
                start = time.perf_counter()
                hook = (lambda frac, c=controller.name, s=seed: progress(c, s, frac)) if progress else None
                metrics = run_episode(env, controller, seed, hook)
                results.append(EpisodeResult(controller.name, seed, metrics, time.perf_counter() - start))
    return results


def summarise(results: list[EpisodeResult], key: str) -> dict[str, tuple[float, float]]:
    """Per controller: mean and sample std of one metric over seeds (std 0 with one seed)."""
    out: dict[str, tuple[float, float]] = {}
    for name in dict.fromkeys(r.controller for r in results):
        mean, std = mean_std([getattr(r.metrics, key) for r in results if r.controller == name])
        out[name] = (mean, 0.0 if math.isnan(std) else std)  # a NaN metric (no vehicle) has no spread to show
    return out


@dataclass(frozen=True)
class Summary:
    """Mean ± std over seeds of every summary metric, per controller: computed once for the tables, JSON and plot."""

    metrics: dict[str, dict[str, tuple[float, float]]]  # metric -> controller -> (mean, std)

    @property
    def controllers(self) -> list[str]:
        return list(next(iter(self.metrics.values()), {}))


def summarise_metrics(results: list[EpisodeResult], keys: tuple[str, ...] = SUMMARY_METRICS) -> Summary:
    """The one summary `reled eval` prints, writes to JSON and plots, so all three show the same numbers."""
    return Summary({key: summarise(results, key) for key in keys})
