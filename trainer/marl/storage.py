"""Rollout storage: whole episodes from the workers, flattened into one batch for the learner.

A batch row is one agent's decision. ``from_expert`` marks rows that come from demonstrations
rather than the agents' own rollouts: PPO's terms use only agent rows, an imitation term (RELED's
hybrid optimization) uses the expert rows, so both kinds of sample share one storage.
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


def discounted_running_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """r_0, γ·r_0 + r_1, ... per agent: what return normalization measures the spread of."""
    out = np.empty_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1:], dtype=np.float64)
    for t in range(rewards.shape[0]):
        running = gamma * running + rewards[t]
        out[t] = running
    return out
