"""The parameter-shared actor (masked logits over the padded phase set) and the critics.

One actor serves every intersection: the observation schema is padded to ``MAX_PHASES`` phases and
invalid phases are masked out of the logits, so an invalid phase never gets probability. The
observation normalizer lives inside the actor so that export carries it to the controller.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_runtime.features import MAX_PHASES, feature_size

MASKED_LOGIT = -1e9  # exp(MASKED_LOGIT - max) underflows to exactly 0 in float32


class RunningNorm(nn.Module):
    """Running mean and variance (Chan et al. parallel update); buffers travel with state_dict."""

    def __init__(self, size: int, clip: float = 10.0, enabled: bool = True):
        super().__init__()
        self.clip = clip
        self.enabled = enabled
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("var", torch.ones(size, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        batch = batch.reshape(-1, self.mean.shape[0]).double()
        n = batch.shape[0]
        mean, var = batch.mean(0), batch.var(0, unbiased=False)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + var * n + delta.square() * self.count * n / total) / total
        self.count = total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        scaled = (x - self.mean.float()) / torch.sqrt(self.var.float() + 1e-8)
        return scaled.clamp(-self.clip, self.clip)


def mlp(inputs: int, hidden: int, layers: int, outputs: int, out_gain: float) -> nn.Sequential:
    """Tanh MLP with orthogonal init (gain √2 inside, ``out_gain`` on the head), as in MAPPO."""
    modules: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        linear = nn.Linear(width, hidden)
        nn.init.orthogonal_(linear.weight, gain=2 ** 0.5)
        nn.init.zeros_(linear.bias)
        modules += [linear, nn.Tanh()]
        width = hidden
    head = nn.Linear(width, outputs)
    nn.init.orthogonal_(head.weight, gain=out_gain)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*modules, head)


def masked_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), logits, torch.full_like(logits, MASKED_LOGIT))


class Actor(nn.Module):
    """obs [B, F] (raw features) and mask [B, P] → masked logits [B, P]."""

    def __init__(self, hidden: int = 64, layers: int = 2, normalize_obs: bool = True):
        super().__init__()
        self.obs_norm = RunningNorm(feature_size(), enabled=normalize_obs)
        self.body = mlp(feature_size(), hidden, layers, MAX_PHASES, out_gain=0.01)

    def forward(self, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_logits(self.body(self.obs_norm(obs)), mask)

    def distribution(self, obs: torch.Tensor, mask: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self(obs, mask))


class Critic(nn.Module):
    """Value of a (normalized) critic input: the local observation (IPPO) or the global state (MAPPO)."""

    def __init__(self, inputs: int, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.body = mlp(inputs, hidden, layers, 1, out_gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


def critic_inputs(obs: torch.Tensor, centralized: bool) -> torch.Tensor:
    """[T, N, F] observations → [T, N, C] critic inputs.

    IPPO: each agent's own observation. MAPPO: the global state (every agent's observation, in a
    fixed agent order) with the agent's one-hot id, so one shared critic can value each agent.
    """
    if not centralized:
        return obs
    steps, agents, _ = obs.shape
    state = obs.reshape(steps, 1, -1).expand(steps, agents, -1)
    ids = torch.eye(agents, dtype=obs.dtype).expand(steps, agents, agents)
    return torch.cat([state, ids], dim=-1)


def critic_input_size(n_agents: int, centralized: bool) -> int:
    return n_agents * feature_size() + n_agents if centralized else feature_size()
