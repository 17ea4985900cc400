"""Acting with the shared actor: batched over agents, sampled (training) or greedy (evaluation).

``PolicyController`` puts a trained actor behind the same interface as the heuristics, so
`reled eval --policy` reports exactly the table and metrics that `reled eval --controller` does.
The actor is shared by every light and reads the padded observation schema, so it can drive any
number of lights: `reled eval --zero-shot` runs it on a scenario it was not trained on, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from trainer.controllers.base import StackedController
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.marl.checkpoint import actor_from_checkpoint, check_scenario, load_checkpoint, trained_here
from trainer.marl.networks import Actor
from trainer.rollout import Decision
from trainer.scenarios import Scenario

log = logging.getLogger(__name__)


@torch.no_grad()
def choose_actions(actor: Actor, obs: np.ndarray, masks: np.ndarray, deterministic: bool,
                   generator: torch.Generator | None = None) -> np.ndarray:
    """Masked argmax or a masked sample per agent."""
    logits = actor(torch.from_numpy(obs), torch.from_numpy(masks))
    if deterministic:
        return logits.argmax(-1).numpy()
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).numpy()


@dataclass(frozen=True)
class PolicyOrigin:
    """Where an evaluated policy comes from, for reports: its checkpoint and the scenario it learned on."""

    checkpoint: str
    trained_on: str
    zero_shot: bool  # evaluated on another scenario than the one it was trained on


class PolicyController(StackedController):
    """A trained actor as a controller: the most probable valid phase, or (training) a sample seeded per episode."""

    name: ClassVar[str] = "policy"

    def __init__(self, actor: Actor, label: str = "policy", deterministic: bool = True,
                 origin: PolicyOrigin | None = None):
        self.actor = actor.eval()
        self.name = label  # type: ignore[misc]  # the row label in evaluation tables
        self.deterministic = deterministic
        self.generator = torch.Generator()
        self.origin = origin  # None: an actor that did not come from a checkpoint

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def decide(self, decision: Decision) -> dict[str, int]:
        actions = choose_actions(self.actor, decision.obs, decision.masks, self.deterministic, self.generator)
        return dict(zip(decision.observations, actions.tolist(), strict=True))


def load_policy_controller(path: Path, scenario: Scenario, config: EnvConfig,
                           zero_shot: bool = False) -> PolicyController:
    """A checkpoint as a controller; refused if it was trained for other intersections, unless ``zero_shot``
    asks to run it there anyway (its label then names the scenario it was trained on)."""
    data = load_checkpoint(path)
    probe = TrafficSignalEnv(config, resolved=scenario)
    try:
        agents, n_phases = list(probe.possible_agents), [i.n_phases for i in probe.intersections]
    finally:
        probe.close()
    if not zero_shot:
        check_scenario(data, path, config.scenario, agents, n_phases,
                       other_use="pass --zero-shot to run it on this scenario anyway")
    elsewhere = zero_shot and not trained_here(data, config.scenario, agents, n_phases)
    if zero_shot and not elsewhere:
        log.warning("%s was trained on this scenario: --zero-shot changes nothing", path)
    trained = data["config"].get("timing") or asdict(scenario.timing)  # none saved: the scenario's own
    now = asdict(config.timing or scenario.timing)
    if trained != now:
        log.warning("%s was trained with signal timing %s but is evaluated with %s (pass the run's --config)",
                    path, trained, now)
    label = f"{data['algo']}:{path.parent.name}/{path.stem}"
    if elsewhere:
        label += f" (zero-shot from {Path(data['scenario']).name})"
    return PolicyController(actor_from_checkpoint(data), label,
                            origin=PolicyOrigin(str(path), data["scenario"], elsewhere))
