"""Rollout storage: whole episodes from the workers, flattened into one batch for the learner.

A batch row is one agent's decision. ``from_expert`` marks rows that come from demonstrations
rather than the agents' own rollouts: PPO's terms use only agent rows, an imitation term (RELED's
hybrid optimization) uses the expert rows, so both kinds of sample share one storage. Street rows
(decisions controllers recorded, ``trainer.marl.street``) are agent rows that another policy played:
``is_weight`` carries their importance weight, 1 on every simulated row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class RolloutBatch:
    """Flat rows [B, ...] ready for minibatches."""

    obs: torch.Tensor  # [B, F]
    masks: torch.Tensor  # [B, P] bool
    actions: torch.Tensor  # [B]
    old_log_probs: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]
    returns: torch.Tensor  # [B] in scaled reward units
    critic_in: torch.Tensor  # [B, C]
    from_expert: torch.Tensor  # [B] bool
    weight: torch.Tensor  # [B] imitation weight w_k of an expert row (0 on agent rows)
    is_weight: torch.Tensor | None = None  # [B] scales the row's policy term; None: 1 on every row (simulation)

    def __post_init__(self) -> None:
        if self.is_weight is None:
            self.is_weight = torch.ones(len(self))

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def rows(self, index: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        return RolloutBatch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(RolloutBatch)})


def gae(rewards: torch.Tensor, values: torch.Tensor, bootstrap: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over one episode.

    rewards, values: [T, ...]; bootstrap: value after the last step (zeros if the episode
    terminated, V(last obs) if it was truncated by the time limit). Returns (advantages, returns).
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(bootstrap)
    next_value = bootstrap
    for t in range(rewards.shape[0] - 1, -1, -1):
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


def vtrace(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, log_ratios: np.ndarray,
           last: np.ndarray, gamma: float, lam: float, rho_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GAE(λ) with V-trace's truncated importance weights (Espeholt et al. 2018), for rows another policy played.

    Transitions are in sequence order: t went from x_t (value ``values[t]``) with reward r_t to x_t+1 (value
    ``next_values[t]``); ``log_ratios[t]`` = log π(a_t|x_t) − log μ(a_t|x_t), μ the policy that played;
    ``last[t]``: x_t+1 ends its sequence (its value bootstraps). With ρ_t = min(ρ̄, π/μ), c_t = λ·min(1, ρ_t):

        δ_t = r_t + γ·V(x_t+1) − V(x_t)
        d_t = ρ_t·δ_t + γ·c_t·d_t+1       (d = 0 past a sequence's end)
        v_t = V(x_t) + d_t                 the value target
        A_t = δ_t + γ·λ·d_t+1              the advantage of a_t (a_t is given: step t carries no weight)

    On-policy (π = μ, ρ̄ ≥ 1) d_t is GAE's advantage and v_t its return. Returns (A, v, ρ).
    """
    rho = np.minimum(rho_max, np.exp(log_ratios))
    trace = lam * np.minimum(1.0, rho)
    deltas = rewards + gamma * next_values - values
    advantages = np.zeros(len(rewards))
    corrections = np.zeros(len(rewards))
    following = 0.0  # d_t+1
    for t in range(len(rewards) - 1, -1, -1):
        if last[t]:
            following = 0.0
        advantages[t] = deltas[t] + gamma * lam * following
        corrections[t] = following = rho[t] * deltas[t] + gamma * trace[t] * following
    return advantages, values + corrections, rho


def discounted_running_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """r_0, γ·r_0 + r_1, ... per agent: what return normalization measures the spread of."""
    out = np.empty_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1:], dtype=np.float64)
    for t in range(rewards.shape[0]):
        running = gamma * running + rewards[t]
        out[t] = running
    return out
