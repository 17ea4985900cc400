"""RELED's hybrid expert-agent policy optimization (HPO): per-agent imitation weights and expert rows.

For agent k the loss gains w_k · E_(o,a_E)∈demos(k)[−log π_θ(a_E|o)] with

    w_k = w_max · (1 − exp(−d_k/σ)) · sigmoid((G_E,k − G_A,k) / (s·|G_A,k|))

d_k the DTW distance between agent k's latest trajectory and its expert trajectory, σ the running
mean of d, G_E,k and G_A,k the expert's and the agent's mean reward per decision on agent k. G_A,k comes
from the latest greedy evaluation (what the agent would deploy, as the demonstration is what the expert
deploys); the sampled training episodes, which explore, made the expert look better in every update of a
cologne8 run (7 or 8 of 8 agents), long after the greedy policy had matched its delay. Before the first
evaluation the training episodes stand in. Far from
a better expert: imitate; close to it or past it: explore (the gate closes on an expert that is
worse than the agent). The gate's scale is relative to |G_A,k| (a documented departure from a
fixed s: queue rewards differ by an order of magnitude between nets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import RELEDError
from trainer.marl.config import HPOConfig
from trainer.marl.dtw import dtw_distance, trajectory
from trainer.marl.networks import Actor
from trainer.marl.storage import RolloutBatch
from trainer.rollout import Episode
from trainer.sed.store import DemoSet


def sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(x / 2.0))  # no overflow for any x


def imitation_weight(distance: float, sigma: float, expert_return: float, agent_return: float, *,
                     w_max: float, gate_scale: float, dtw: bool = True, gate: bool = True) -> float:
    """w_k of one agent (the formula above); ``dtw``/``gate`` False replace their factor by 1."""
    far = 1.0 if not dtw else (1.0 - math.exp(-distance / sigma) if sigma > 0 else float(distance > 0))
    better = 1.0 if not gate else sigmoid((expert_return - agent_return) / (gate_scale * max(abs(agent_return),
                                                                                                1e-9)))
    return w_max * far * better


@dataclass(frozen=True)
class AgentWeight:
    """One agent's weight and what it was computed from (a row of hpo.csv)."""

    agent: int
    distance: float  # d_k
    expert_return: float  # G_E,k
    agent_return: float  # G_A,k
    weight: float  # w_k

    @property
    def gap(self) -> float:
        return self.expert_return - self.agent_return


class Demonstrations:
    """The kept demonstration rows of one store, ready for the imitation term and for DTW."""

    def __init__(self, demos: DemoSet, n_agents: int):
        cols = demos.columns
        action, mask, agent = np.asarray(cols["action"]), np.asarray(cols["mask"]), np.asarray(cols["agent"])
        valid = action >= 0
        valid[valid] = mask[np.flatnonzero(valid), action[valid]]  # the shield's phase, always allowed
        missing = sorted(set(range(n_agents)) - set(agent[valid].tolist()))
        if missing:
            raise RELEDError(f"{demos.folder} has no demonstration rows for agent(s) {missing}: regenerate it")
        self.folder = demos.folder
        self.manifest = demos.manifest
        self.obs = torch.from_numpy(np.asarray(cols["obs"])[valid])
        self.masks = torch.from_numpy(mask[valid])
        self.actions = torch.from_numpy(action[valid])
        self.agent = torch.from_numpy(agent[valid].astype(np.int64))
        step, reward = np.asarray(cols["step"]), np.asarray(cols["reward"])
        self.by_agent: list[tuple[np.ndarray, np.ndarray]] = []  # per agent: raw obs and actions in step order
        self.expert_return = np.zeros(n_agents)  # G_E,k: mean reward per decision
        for k in range(n_agents):
            rows = np.flatnonzero(agent == k)
            rows = rows[np.argsort(step[rows], kind="stable")]
            self.by_agent.append((np.asarray(cols["obs"])[rows], action[rows]))
            self.expert_return[k] = float(np.mean(reward[rows]))

    def __len__(self) -> int:
        return len(self.actions)


class HybridObjective:
    """The per-update weights, the expert rows they weight, and σ's running mean (resumed exactly)."""

    def __init__(self, config: HPOConfig, demos: Demonstrations):
        self.config = config
        self.demos = demos
        self.distance_sum = 0.0
        self.distance_count = 0

    @property
    def sigma(self) -> float:
        return self.distance_sum / self.distance_count if self.distance_count else 0.0

    @torch.no_grad()
    def weigh(self, episodes: list[Episode], actor: Actor, greedy_return: list[float] | None = None,
              ) -> list[AgentWeight]:
        """w_k for every agent from this update's episodes (d_k from the latest one); G_A,k from
        ``greedy_return`` (the latest evaluation's, per agent) when there is one."""
        latest = episodes[-1]
        n_agents = latest.obs.shape[1]
        normalize = actor.obs_norm
        distances = []
        for k in range(n_agents):
            expert_obs, expert_actions = self.demos.by_agent[k]
            mine = trajectory(normalize(torch.from_numpy(latest.obs[:, k])).numpy(), latest.actions[:, k])
            theirs = trajectory(normalize(torch.from_numpy(np.ascontiguousarray(expert_obs))).numpy(),
                                expert_actions)
            distances.append(dtw_distance(mine, theirs))
        self.distance_sum += float(np.sum(distances))
        self.distance_count += len(distances)
        agent_return = np.asarray(greedy_return) if greedy_return else np.mean(
            [ep.rewards.mean(axis=0) for ep in episodes], axis=0)
        fixed = self.config.fixed_weight()
        out = []
        for k in range(n_agents):
            g_e, g_a = float(self.demos.expert_return[k]), float(agent_return[k])
            w = fixed if fixed is not None else imitation_weight(
                distances[k], self.sigma, g_e, g_a, w_max=self.config.w_max, gate_scale=self.config.gate_scale,
                dtw=self.config.dtw, gate=self.config.gate)
            out.append(AgentWeight(k, distances[k], g_e, g_a, w))
        return out

    def expert_rows(self, weights: list[AgentWeight], critic_width: int) -> RolloutBatch:
        """Every demonstration row, marked as expert and weighted by its agent's w_k."""
        d = self.demos
        w = torch.tensor([a.weight for a in weights], dtype=torch.float32)[d.agent]
        zeros = torch.zeros(len(d))
        return RolloutBatch(obs=d.obs, masks=d.masks, actions=d.actions, old_log_probs=zeros, advantages=zeros,
                            returns=zeros, critic_in=torch.zeros(len(d), critic_width),
                            from_expert=torch.ones(len(d), dtype=torch.bool), weight=w)

    def state_dict(self) -> dict[str, Any]:
        return {"distance_sum": self.distance_sum, "distance_count": self.distance_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.distance_sum = float(state["distance_sum"])
        self.distance_count = int(state["distance_count"])


def weight_summary(weights: list[AgentWeight], sigma: float) -> dict[str, float]:
    """What metrics.csv records per update (hpo.csv has every agent)."""
    w = np.array([a.weight for a in weights])
    return {"hpo/w_mean": float(w.mean()), "hpo/w_min": float(w.min()), "hpo/w_max": float(w.max()),
            "hpo/d_mean": float(np.mean([a.distance for a in weights])), "hpo/sigma": sigma,
            "hpo/gap_mean": float(np.mean([a.gap for a in weights])),
            "hpo/gate_open": float(np.mean([a.gap > 0 for a in weights]))}
