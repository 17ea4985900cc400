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
from trainer.scenarios import DecisionTiming, scenario_identity

Algo = Literal["ippo", "mappo", "reled"]
ALGOS: tuple[str, ...] = ("ippo", "mappo", "reled")
WorkersBackend = Literal["local", "ray"]
WORKERS_BACKENDS: tuple[str, ...] = ("local", "ray")
WEIGHT_MODES = "adaptive, fixed:X or none"


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
class HPOConfig:
    """RELED's hybrid expert-agent policy optimization (the `[reled]` section; docs/training.md).

    w_k = w_max · (1 − exp(−d_k/σ)) · sigmoid((G_E,k − G_A,k) / (s·|G_A,k|)), σ the running mean of d.
    """

    demos: str = ""  # a demonstration store; "" = generate one at the start (SED's verified mode)
    expert_weight: str = "adaptive"  # adaptive (the formula), fixed:X (w_k = X) or none (w_k = 0)
    w_max: float = 1.0  # the imitation term's largest weight (its NLL starts near log 4 ≈ 1.4)
    gate_scale: float = 0.1  # s: a 10% better (worse) expert return gives sigmoid(±1) = 0.73 (0.27)
    gate: bool = True  # off: the sigmoid factor is 1 (an expert worse than the agent still teaches)
    dtw: bool = True  # off: the distance factor is 1 (w_k = w_max · gate)
    sed: bool = True  # off: round-0 demonstrations without the bound (λ = 0) and no SED passes
    sed_every: int = 25  # updates between SED passes (re-score D_j, refine, replace); 0 = never
    sed_llm: bool = True  # SED with the embedded LLM (off: the classical tools only, --no-llm)

    def __post_init__(self) -> None:
        self.fixed_weight()  # validates expert_weight
        if self.w_max < 0 or self.gate_scale <= 0 or self.sed_every < 0:
            raise RELEDError("reled w_max must be >= 0, gate_scale > 0 and sed_every >= 0")

    def fixed_weight(self) -> float | None:
        """The constant weight of ``fixed:X`` (0 for ``none``); None for the adaptive formula."""
        mode = self.expert_weight
        if mode == "adaptive":
            return None
        if mode == "none":
            return 0.0
        if mode.startswith("fixed:"):
            try:
                value = float(mode.removeprefix("fixed:"))
            except ValueError:
                value = -1.0
            if value >= 0:
                return value
        raise RELEDError(f"--expert-weight {mode!r} is not one of {WEIGHT_MODES} (X a number >= 0, e.g. fixed:0.5)")

    @property
    def refines(self) -> bool:
        """Whether SED passes run during training."""
        return self.sed and self.sed_every > 0


@dataclass(frozen=True)
class TrainConfig:
    """What one run trains (the `[train]` section) plus the PPO settings and environment."""

    algo: Algo = "ippo"
    scenario: str = "grid2x2"
    demand: str = "moderate"
    steps: int = 300_000  # agent-steps (decisions of one intersection) to train for
    workers: int = 2  # SUMO worker processes (or Ray actors)
    backend_workers: WorkersBackend = "local"  # local worker processes or Ray actors (trainer.marl.ray_workers)
    ray_address: str = "local"  # Ray's address: local (a private Ray here), auto or HOST:PORT of a cluster
    seed: int = 0
    episodes_per_update: int = 2  # SUMO episodes collected per PPO update (independent of workers)
    eval_every: int = 5  # updates between evaluations (deterministic actions)
    eval_episodes: int = 2  # evaluation episodes each time (SUMO seeds continue across evaluations)
    threads: int = 2  # torch threads of the learner
    overlap: bool = False  # collect the next update's episodes while the learner updates (one update behind)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    hpo: HPOConfig = field(default_factory=HPOConfig)  # used by algo reled only
    env: EnvConfig = field(default_factory=EnvConfig)

    def __post_init__(self) -> None:
        # one identity for the scenario however it was typed (a folder becomes its absolute path), so that
        # eval, export and --resume recognise the run from any directory
        object.__setattr__(self, "scenario", scenario_identity(self.scenario))
        # the environment plays the run's scenario and demand: derived here, never set twice
        object.__setattr__(self, "env", dataclasses.replace(self.env, scenario=self.scenario, demand=self.demand))
        if self.algo not in ALGOS:
            raise RELEDError(f"unknown algorithm {self.algo!r}: choose one of {', '.join(ALGOS)}")
        if self.backend_workers not in WORKERS_BACKENDS:
            raise RELEDError(f"unknown --backend-workers {self.backend_workers!r}: choose one of "
                             f"{', '.join(WORKERS_BACKENDS)}")
        for name in ("steps", "workers", "episodes_per_update", "eval_every", "eval_episodes", "threads"):
            if getattr(self, name) < 1:
                raise RELEDError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ppo.epochs < 1 or self.ppo.minibatches < 1 or self.ppo.hidden < 1 or self.ppo.layers < 1:
            raise RELEDError("ppo epochs, minibatches, hidden and layers must be at least 1")
        if not 0 < self.ppo.gamma <= 1 or not 0 <= self.ppo.gae_lambda <= 1:
            raise RELEDError("ppo gamma must be in (0, 1] and gae_lambda in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        """TOML-ready: sections [train], [ppo], [env], [timing]; None values left out."""
        train = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NESTED}
        env = {k: v for k, v in dataclasses.asdict(self.env).items() if v is not None and k in TRAIN_ENV_KEYS}
        out = {"train": train, "ppo": dataclasses.asdict(self.ppo), "env": env}
        if self.algo == "reled":
            out["reled"] = dataclasses.asdict(self.hpo)
        if self.env.timing is not None:
            out["timing"] = dataclasses.asdict(self.env.timing)
        return out


NESTED = ("ppo", "hpo", "env")  # TrainConfig fields that are sections of their own
TRAIN_KEYS = settings_keys(TrainConfig, exclude=NESTED)
# what a training run may set in [env]; fixed-time mode, the GUI and metrics-off make no sense in training,
# and scenario / demand belong to [train]
TRAIN_ENV_KEYS = {"reward", "backend", "episode_seconds", "detector_range", "time_to_teleport"}
SECTIONS: dict[str, tuple[type, set[str]]] = {
    "train": (TrainConfig, TRAIN_KEYS), "ppo": (PPOConfig, settings_keys(PPOConfig)),
    "reled": (HPOConfig, settings_keys(HPOConfig)),
    "env": (EnvConfig, TRAIN_ENV_KEYS), "timing": (DecisionTiming, settings_keys(DecisionTiming))}


def load_train_config(path: Path | None, *, train: dict[str, Any], ppo: dict[str, Any] | None = None,
                      hpo: dict[str, Any] | None = None, env: dict[str, Any] | None = None,
                      timing: dict[str, Any] | None = None) -> TrainConfig:
    """File values first, then every flag that is not None; unknown keys and wrong types are refused."""
    given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path is not None:
        given.update(read_sections(path, SECTIONS))
    source = f"config file {path}" if path is not None else "flags"
    values = {name: section_values(source, name, given[name], cls, allowed=keys)
              for name, (cls, keys) in SECTIONS.items()}
    for name, flags in (("train", train), ("ppo", ppo or {}), ("reled", hpo or {}), ("env", env or {}),
                        ("timing", timing or {})):
        cls, keys = SECTIONS[name]
        values[name].update(section_values("flags", name, {k: v for k, v in flags.items() if v is not None},
                                           cls, allowed=keys))
    timing_cfg = build_section(source, "timing", values["timing"], DecisionTiming) if values["timing"] else None
    if values["reled"] and values["train"].get("algo", TrainConfig.algo) != "reled":
        raise RELEDError(f"{', '.join(sorted(values['reled']))}: RELED settings need --algo reled")
    return build_section(source, "train", values["train"], TrainConfig, allowed=TRAIN_KEYS,
                         ppo=build_section(source, "ppo", values["ppo"], PPOConfig),
                         hpo=build_section(source, "reled", values["reled"], HPOConfig),
                         env=build_section(source, "env", values["env"], EnvConfig, allowed=TRAIN_ENV_KEYS,
                                           timing=timing_cfg))
