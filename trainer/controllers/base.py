"""The controller interface and the classic heuristics: fixed-time, max-pressure, greedy, random.

A controller sees what a learned policy sees (per agent: observation vector and action mask,
plus infos) and returns a green phase per agent. Learned policies implement the same two calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.features import APPROACHING_AT, MAX_PHASES, QUEUE_AT
from trainer.rollout import Decision, Observations, stack_observations


class Controller:
    """Base: ``act`` maps each agent's observation to a green-phase index."""

    name: ClassVar[str] = "base"
    drives_signals: ClassVar[bool] = True  # False: the net's own programs run untouched
    needs_pressure: ClassVar[bool] = False  # True: the env must put phase pressure in infos
    needs_inflow: ClassVar[bool] = False  # True: the env must put per-lane arrivals in infos
    needs_snapshots: ClassVar[bool] = False  # True: the env must allow snapshot()/restore() (look-ahead)

    def attach(self, env: Any) -> None:
        """Called once with the environment it will drive (experts read its layout and lanes)."""

    def reset(self, seed: int) -> None:
        """Called at the start of every episode, after the environment was reset."""

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        raise NotImplementedError

    def decide(self, decision: Decision) -> dict[str, int]:
        """What the episode loop calls; controllers that work on stacked arrays override it."""
        return self.act(decision.observations, decision.infos)

    def close(self) -> None:
        """Release what the controller holds (worker processes, files); called once it is done."""


class StackedController(Controller):
    """A controller that works on the stacked arrays (one batched call for every light): ``act`` stacks them."""

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        obs, masks = stack_observations(observations, list(observations))
        return self.decide(Decision(observations, infos, obs, masks))


def _masked_argmax(scores: np.ndarray, mask: np.ndarray) -> int:
    return int(np.argmax(np.where(mask.astype(bool), scores, -np.inf)))


class FixedTime(Controller):
    """The network's own signal programs, as SUMO runs them."""

    name = "fixed"
    drives_signals = False

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        return {}


def greedy_phase(observation: dict[str, np.ndarray]) -> int:
    """The phase with the longest queue; ties go to approaching traffic."""
    vec = observation["observation"]
    queue = vec[QUEUE_AT:QUEUE_AT + MAX_PHASES]
    approaching = vec[APPROACHING_AT:APPROACHING_AT + MAX_PHASES]
    return _masked_argmax(queue + 1e-3 * approaching, observation["action_mask"])


def max_pressure_phase(observation: dict[str, np.ndarray], info: dict[str, Any]) -> int:
    """The phase whose movements have the most upstream minus downstream vehicles."""
    pressure = info["phase_pressure"]
    return _masked_argmax(pressure, observation["action_mask"][: len(pressure)])


class Greedy(Controller):
    """Serve the phase with the longest queue (RESCO's 'greedy'); ties go to approaching traffic."""

    name = "greedy"

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        return {agent: greedy_phase(ob) for agent, ob in observations.items()}


class MaxPressure(Controller):
    """Varaiya's max-pressure: the phase whose movements have the most upstream minus downstream vehicles."""

    name = "max-pressure"
    needs_pressure = True

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        return {agent: max_pressure_phase(ob, infos[agent]) for agent, ob in observations.items()}


class RandomController(Controller):
    """Uniform over the valid phases; seeded per episode."""

    name = "random"

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        return {agent: int(self.rng.choice(np.flatnonzero(ob["action_mask"])))
                for agent, ob in observations.items()}


CONTROLLERS: dict[str, Callable[[], Controller]] = {
    c.name: c for c in (FixedTime, Greedy, MaxPressure, RandomController)
}


def make_controller(name: str) -> Controller:
    if name not in CONTROLLERS:
        raise RELEDError(f"unknown controller {name!r}: choose one of {', '.join(CONTROLLERS)}")
    return CONTROLLERS[name]()
