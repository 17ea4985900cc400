"""Acting with the shared actor: batched over agents, sampled (training) or greedy (evaluation).

``PolicyController`` puts a trained actor behind the same interface as the heuristics, so
`reled eval --policy` reports exactly the table and metrics that `reled eval --controller` does.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from trainer.controllers import Controller
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.marl.checkpoint import actor_from_checkpoint, check_scenario, load_checkpoint
from trainer.marl.networks import Actor
from trainer.rollout import Decision, Observations, stack_observations
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


class PolicyController(Controller):
    """A trained actor as a controller: the most probable valid phase, or (training) a sample seeded per episode."""

    name: ClassVar[str] = "policy"

    def __init__(self, actor: Actor, label: str = "policy", deterministic: bool = True):
        self.actor = actor.eval()
        self.name = label  # type: ignore[misc]  # the row label in evaluation tables
        self.deterministic = deterministic
        self.generator = torch.Generator()

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def decide(self, decision: Decision) -> dict[str, int]:
        actions = choose_actions(self.actor, decision.obs, decision.masks, self.deterministic, self.generator)
        return dict(zip(decision.observations, actions.tolist(), strict=True))

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        obs, masks = stack_observations(observations, list(observations))
        return self.decide(Decision(observations, infos, obs, masks))


def load_policy_controller(path: Path, scenario: Scenario, config: EnvConfig) -> PolicyController:
    """A checkpoint as a controller, refused if it was trained for other intersections."""
    data = load_checkpoint(path)
    probe = TrafficSignalEnv(config, resolved=scenario)
    try:
        check_scenario(data, path, scenario.name, list(probe.possible_agents),
                       [i.n_phases for i in probe.intersections])
    finally:
        probe.close()
    trained = data["config"].get("timing") or asdict(scenario.timing)  # none saved: the scenario's own
    now = asdict(config.timing or scenario.timing)
    if trained != now:
        log.warning("%s was trained with signal timing %s but is evaluated with %s (pass the run's --config)",
                    path, trained, now)
    label = f"{data['algo']}:{path.parent.name}/{path.stem}"
    return PolicyController(actor_from_checkpoint(data), label)
