"""The one episode loop, and the one recording of an episode.

Evaluation, training workers, SED's expert episodes and the export's hold-out observations all
play episodes the same way: reset, then decide → step until the episode ends (or a decision cap),
recording every decision. Who decides is a :class:`~trainer.controllers.Controller` (a heuristic, a
trained actor, the LLM expert); its rows are marked as expert or agent rows, so demonstrations and
the agents' own rollouts share one format and one storage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from trainer.controllers import Controller
    from trainer.env import TrafficSignalEnv

Observations = dict[str, dict[str, np.ndarray]]
Source = Literal["agent", "expert"]
NO_ACTION = -1  # recorded where a controller proposed nothing (fixed-time leaves the net's program running)


def stack_observations(observations: Observations, agents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-agent dicts → obs [N, F] float32 and mask [N, P] bool, in ``agents`` order."""
    obs = np.stack([observations[a]["observation"] for a in agents])
    masks = np.stack([observations[a]["action_mask"] for a in agents]).astype(bool)
    return obs, masks


@dataclass(frozen=True)
class Decision:
    """What a controller sees at one decision: the per-agent dicts and the same data stacked."""

    observations: Observations
    infos: dict[str, dict[str, Any]]
    obs: np.ndarray  # [N, F] float32, agents in the env's order
    masks: np.ndarray  # [N, P] bool


@dataclass
class Episode:
    """One SUMO episode played by every agent, agents in the env's fixed order."""

    seed: int
    obs: np.ndarray  # [T, N, F] float32, raw features
    masks: np.ndarray  # [T, N, P] bool
    actions: np.ndarray  # [T, N] int64 (NO_ACTION where nothing was proposed)
    rewards: np.ndarray  # [T, N] float32
    last_obs: np.ndarray  # [N, F] observation after the last decision (bootstrap of the truncated tail)
    from_expert: np.ndarray | None = None  # [T, N] bool: demonstration rows (None: all agent rows)
    metrics: dict[str, float] = field(default_factory=dict)  # trip metrics from SUMO (avg_delay, ...)
    sim_seconds: float = 0.0  # wall time inside SUMO and the environment
    policy_seconds: float = 0.0  # wall time choosing actions

    def __post_init__(self) -> None:
        if self.from_expert is None:
            self.from_expert = np.zeros(self.actions.shape, dtype=bool)

    @property
    def agent_steps(self) -> int:
        return int(self.actions.size)

    @property
    def mean_agent_return(self) -> float:
        """Undiscounted reward summed over the episode, averaged over agents."""
        return float(self.rewards.sum(0).mean())


def play_episode(env: TrafficSignalEnv, controller: Controller, seed: int, *, source: Source = "agent",
                 max_decisions: int | None = None, on_step: Callable[[float], None] | None = None,
                 start_from: Callable[[], tuple[Observations, dict[str, dict[str, Any]]]] | None = None) -> Episode:
    """Play one episode (or its first ``max_decisions`` decisions) with ``controller`` deciding for every agent.

    ``on_step`` gets the fraction of the episode's simulated time done after each decision. ``start_from``
    replaces ``env.reset(seed)`` (a look-ahead continues from ``env.restore(snapshot)``).
    """
    agents = list(env.possible_agents)
    span = env.end_time - env.scenario.begin
    sim_seconds = policy_seconds = 0.0
    start = time.perf_counter()
    observations, infos = env.reset(seed=seed) if start_from is None else start_from()
    controller.reset(seed)
    sim_seconds += time.perf_counter() - start
    obs_rows, mask_rows, action_rows, reward_rows = [], [], [], []
    while env.agents and (max_decisions is None or len(obs_rows) < max_decisions):
        start = time.perf_counter()
        obs, masks = stack_observations(observations, agents)
        actions = controller.decide(Decision(observations, infos, obs, masks))
        middle = time.perf_counter()
        observations, rewards, _term, _trunc, infos = env.step(actions)
        sim_seconds += time.perf_counter() - middle
        policy_seconds += middle - start
        obs_rows.append(obs)
        mask_rows.append(masks)
        action_rows.append([actions.get(a, NO_ACTION) for a in agents])
        reward_rows.append([rewards[a] for a in agents])
        if on_step:
            on_step((env.time - env.scenario.begin) / span)
    actions_arr = np.asarray(action_rows, dtype=np.int64)
    return Episode(seed=seed, obs=np.stack(obs_rows), masks=np.stack(mask_rows), actions=actions_arr,
                   rewards=np.asarray(reward_rows, dtype=np.float32),
                   last_obs=stack_observations(observations, agents)[0],
                   from_expert=np.full(actions_arr.shape, source == "expert"),
                   metrics=env.last_metrics.as_dict() if env.last_metrics and not env.agents else {},
                   sim_seconds=sim_seconds, policy_seconds=policy_seconds)
