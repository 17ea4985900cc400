"""Training configuration: TOML sections [train], [ppo], [env], [timing] plus CLI flags.

Defaults follow the MAPPO paper (Yu et al. 2022, "The Surprising Effectiveness of PPO in Cooperative
Multi-Agent Games") and EPyMARL's PPO settings, scaled to one SUMO episode per worker per batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_runtime.errors import RELEDError
from edge_runtime.settings import build_section, read_sections, section_values, settings_keys
from trainer.env import EnvConfig
from trainer.scenarios import DecisionTiming

Algo = Literal["ippo", "mappo"]
ALGOS: tuple[str, ...] = ("ippo", "mappo")


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (the `[ppo]` section)."""

    lr: float = 5e-4  # MAPPO paper: 5e-4 for actor and critic
    lr_final_fraction: float = 0.1  # linear schedule down to lr * this at the last update
    gamma: float = 0.99  # RESCO and MAPPO
    gae_lambda: float = 0.95  # MAPPO / EPyMARL
    clip: float = 0.2  # MAPPO / EPyMARL
    epochs: int = 10  # MAPPO uses 5-15 epochs on small batches
    minibatches: int = 4
    value_coef: float = 0.5  # c_v
    entropy_coef: float = 0.01  # c_e, MAPPO / EPyMARL
    max_grad_norm: float = 10.0  # MAPPO
    hidden: int = 64  # MAPPO: 64-unit hidden layers
    layers: int = 2
    normalize_obs: bool = True  # running mean/std, exported with the actor
    normalize_returns: bool = True  # rewards divided by a running std of discounted returns


@dataclass(frozen=True)
class TrainConfig:
    """What one run trains (the `[train]` section) plus the PPO settings and environment."""

    algo: Algo = "ippo"
    scenario: str = "grid2x2"
    demand: str = "moderate"
    steps: int = 300_000  # agent-steps (decisions of one intersection) to train for
    workers: int = 2  # SUMO worker processes
    seed: int = 0
    episodes_per_update: int = 2  # SUMO episodes collected per PPO update (independent of workers)
    eval_every: int = 5  # updates between evaluations (deterministic actions)
    eval_episodes: int = 2  # evaluation episodes each time (SUMO seeds continue across evaluations)
    threads: int = 2  # torch threads of the learner
    ppo: PPOConfig = field(default_factory=PPOConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    def __post_init__(self) -> None:
        # the environment plays the run's scenario and demand: derived here, never set twice
        object.__setattr__(self, "env", dataclasses.replace(self.env, scenario=self.scenario, demand=self.demand))
        if self.algo not in ALGOS:
            raise RELEDError(f"unknown algorithm {self.algo!r}: choose one of {', '.join(ALGOS)}")
        for name in ("steps", "workers", "episodes_per_update", "eval_every", "eval_episodes", "threads"):
            if getattr(self, name) < 1:
                raise RELEDError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ppo.epochs < 1 or self.ppo.minibatches < 1 or self.ppo.hidden < 1 or self.ppo.layers < 1:
            raise RELEDError("ppo epochs, minibatches, hidden and layers must be at least 1")
        if not 0 < self.ppo.gamma <= 1 or not 0 <= self.ppo.gae_lambda <= 1:
            raise RELEDError("ppo gamma must be in (0, 1] and gae_lambda in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        """TOML-ready: sections [train], [ppo], [env], [timing]; None values left out."""
        train = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("ppo", "env")}
        env = {k: v for k, v in dataclasses.asdict(self.env).items() if v is not None and k in TRAIN_ENV_KEYS}
        out = {"train": train, "ppo": dataclasses.asdict(self.ppo), "env": env}
        if self.env.timing is not None:
            out["timing"] = dataclasses.asdict(self.env.timing)
        return out


TRAIN_KEYS = settings_keys(TrainConfig, exclude=("ppo", "env"))
# what a training run may set in [env]; fixed-time mode, the GUI and metrics-off make no sense in training,
# and scenario / demand belong to [train]
TRAIN_ENV_KEYS = {"reward", "backend", "episode_seconds", "detector_range", "time_to_teleport"}
SECTIONS: dict[str, tuple[type, set[str]]] = {
    "train": (TrainConfig, TRAIN_KEYS), "ppo": (PPOConfig, settings_keys(PPOConfig)),
    "env": (EnvConfig, TRAIN_ENV_KEYS), "timing": (DecisionTiming, settings_keys(DecisionTiming))}


def load_train_config(path: Path | None, *, train: dict[str, Any], ppo: dict[str, Any] | None = None,
                      env: dict[str, Any] | None = None, timing: dict[str, Any] | None = None) -> TrainConfig:
    """File values first, then every flag that is not None; unknown keys and wrong types are refused."""
    given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        given.update(read_sections(path, SECTIONS))
    source = f"config file {path}" if path is not None else "flags"
    values = {name: section_values(source, name, given[name], cls, allowed=keys)
              for name, (cls, keys) in SECTIONS.items()}
    for name, flags in (("train", train), ("ppo", ppo or {}), ("env", env or {}), ("timing", timing or {})):
        cls, keys = SECTIONS[name]
        values[name].update(section_values("flags", name, {k: v for k, v in flags.items() if v is not None},
                                           cls, allowed=keys))
    timing_cfg = build_section(source, "timing", values["timing"], DecisionTiming) if values["timing"] else None
    return build_section(source, "train", values["train"], TrainConfig, allowed=TRAIN_KEYS,
                         ppo=build_section(source, "ppo", values["ppo"], PPOConfig),
                         env=build_section(source, "env", values["env"], EnvConfig, allowed=TRAIN_ENV_KEYS,
                                           timing=timing_cfg))
