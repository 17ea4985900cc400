"""Replay a kept demonstration set as one consistent episode.

Each subset's best demonstration may come from a different round and candidate; the kept set is only
a demonstration of one controller if its parts work together. The replay drives every subset's lights
with what its kept demonstration did (its controls from each horizon on, or in step mode its phases
decision by decision) in one episode, and the manifest records that episode's delay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.controllers import Controller
from trainer.rollout import Observations, play_episode
from trainer.sed.tools import LightControl, ToolController

if TYPE_CHECKING:
    from trainer.env import TrafficSignalEnv
    from trainer.sed.experts import SubsetContext
    from trainer.sed.refine import RefineResult

Schedule = list[tuple[float, tuple[LightControl, ...]]]  # (from time, controls of every light)


class KeptReplay(Controller):
    """Per light: a schedule of controls (plan and verified modes) or the recorded phases (step mode)."""

    name = "kept-replay"
    needs_pressure = True
    needs_inflow = True

    def __init__(self, schedules: list[Schedule | None], actions: list[np.ndarray | None]) -> None:
        self.schedules = schedules  # per light: the schedule of the demonstration it was kept from
        self.actions = actions  # per light: recorded phases, where its demonstration has no schedule

    def attach(self, env: TrafficSignalEnv) -> None:
        self.agents = list(env.possible_agents)
        n = len(self.agents)
        self.tools = ToolController([LightControl("max-pressure")] * n, [env.scenario.begin] * n)
        self.tools.attach(env)

    def reset(self, seed: int) -> None:
        self.tools.reset(seed)
        self._next = [0] * len(self.agents)
        self._step = 0

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        now = infos[self.agents[0]]["time"]
        for k, schedule in enumerate(self.schedules):
            while schedule and self._next[k] < len(schedule) and schedule[self._next[k]][0] <= now + 1e-6:
                start, controls = schedule[self._next[k]]
                self.tools.set_control(k, controls[k], start)
                self._next[k] += 1
        out = self.tools.act(observations, infos)
        for k, recorded in enumerate(self.actions):
            if recorded is not None and self._step < len(recorded):
                out[self.agents[k]] = int(recorded[self._step])
        self._step += 1
        return out


def replay_kept(env: TrafficSignalEnv, result: RefineResult, contexts: list[SubsetContext], seed: int
                ) -> dict[str, float]:
    """Play the kept set of every subset together, on the demonstrations' seed; its trip metrics."""
    n = len(env.possible_agents)
    schedules: list[Schedule | None] = [None] * n
    actions: list[np.ndarray | None] = [None] * n
    for j, ctx in enumerate(contexts):
        demo = result.kept[j]
        for k in ctx.agents:
            if demo.schedule:
                schedules[k] = demo.schedule
            else:
                actions[k] = demo.episode.actions[:, k]
    controller = KeptReplay(schedules, actions)
    controller.attach(env)
    return play_episode(env, controller, seed).metrics
