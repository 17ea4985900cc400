"""Training configuration: TOML sections [train], [ppo], [env], [timing] plus CLI flags.

Defaults follow the MAPPO paper (Yu et al. 2022, "The Surprising Effectiveness of PPO in Cooperative
Multi-Agent Games") and EPyMARL's PPO settings, scaled to one SUMO episode per worker per batch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import read_toml
from trainer.config import TIMING_KEYS, check_keys
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


TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} - {"ppo", "env"}
# what a training run may set in [env]; fixed-time mode, the GUI and metrics-off make no sense in training,
# and scenario / demand belong to [train]
TRAIN_ENV_KEYS = {"reward", "backend", "episode_seconds", "detector_range", "time_to_teleport"}
PPO_KEYS = {f.name for f in dataclasses.fields(PPOConfig)}


def load_train_config(path: Path | None, *, train: dict[str, Any], ppo: dict[str, Any] | None = None,
                      env: dict[str, Any] | None = None, timing: dict[str, Any] | None = None) -> TrainConfig:
    """File values first, then every flag that is not None; unknown keys and wrong types are refused."""
    sections: dict[str, dict[str, Any]] = {"train": {}, "ppo": {}, "env": {}, "timing": {}}
    allowed = {"train": TRAIN_KEYS, "ppo": PPO_KEYS, "env": TRAIN_ENV_KEYS, "timing": TIMING_KEYS}
    source = "flags"
    if path is not None:
        source = f"config file {path}"
        data = read_toml(path)
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise RELEDError(f"{source}: unknown section(s) {unknown}; expected [train], [ppo], [env], [timing]")
        for name, given in data.items():
            if not isinstance(given, dict):
                raise RELEDError(f"{source}: [{name}] must be a table")
            check_keys(path, name, given, allowed[name])
            sections[name].update(given)
    for name, flags in (("train", train), ("ppo", ppo or {}), ("env", env or {}), ("timing", timing or {})):
        given = {k: v for k, v in flags.items() if v is not None}
        unknown = sorted(set(given) - allowed[name])
        if unknown:
            raise RELEDError(f"unknown [{name}] setting(s) {unknown}; allowed: {', '.join(sorted(allowed[name]))}")
        sections[name].update(given)
    for name, cls in (("train", TrainConfig), ("ppo", PPOConfig), ("env", EnvConfig), ("timing", DecisionTiming)):
        _check_types(source, name, sections[name], cls)
    timing_cfg = DecisionTiming(**sections["timing"]) if sections["timing"] else None
    return TrainConfig(**sections["train"], ppo=PPOConfig(**sections["ppo"]),
                       env=EnvConfig(**sections["env"], timing=timing_cfg))


def _check_types(source: str, section: str, values: dict[str, Any], cls: type) -> None:
    """A value of the wrong type is named with the type it should have (ints are accepted as floats)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        expected = hints.get(key)
        if expected is None or _matches(value, expected):
            continue
        raise RELEDError(f"{source}: [{section}] {key} = {value!r} should be {_type_name(expected)}")


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin is Literal:
        return True  # the constructors name the valid choices (unknown algorithm, reward, backend)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True  # nested configs and tuples are checked by their own constructors


def _type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    return "none" if expected is type(None) else getattr(expected, "__name__", str(expected))
