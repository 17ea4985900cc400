"""The PPO learner shared by IPPO and MAPPO: clipped objective, value loss, entropy bonus.

The loss is a dict of named, already-weighted terms (``loss_terms``) summed into one scalar, so
extensions (RELED's imitation term) add a term instead of rewriting the update.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainer.marl.config import TrainConfig
from trainer.marl.networks import Actor, Critic, RunningNorm, critic_input_size, critic_inputs
from trainer.marl.storage import RolloutBatch, discounted_running_returns, gae
from trainer.rollout import Episode


class PPOLearner:
    """Parameter-shared actor for all agents; IPPO's critic sees the local observation, MAPPO's the
    global state."""

    def __init__(self, config: TrainConfig, n_agents: int):
        ppo = config.ppo
        self.config = config
        self.ppo = ppo
        self.n_agents = n_agents
        self.centralized = config.algo == "mappo"
        self.imitates = config.algo == "reled"  # RELED: IPPO plus the imitation term on expert rows
        torch.manual_seed(config.seed)
        self.actor = Actor(ppo.hidden, ppo.layers, ppo.normalize_obs)
        self.critic = Critic(critic_input_size(n_agents, self.centralized), ppo.hidden, ppo.layers)
        self.return_norm = RunningNorm(1, enabled=ppo.normalize_returns)
        self.optimizer = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters()], lr=ppo.lr,
                                          eps=1e-5)
        self.generator = torch.Generator().manual_seed(config.seed)

    # -- batches -----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, episodes: list[Episode], behaviour: Actor | None = None) -> RolloutBatch:
        """Values, GAE advantages and returns under the current networks; old log-probs under the policy that
        played (``behaviour``: the weights of an earlier update, when collection overlaps learning)."""
        policy = behaviour or self.actor
        self._update_return_norm(episodes)
        scale = self.reward_scale()
        parts = []
        for ep in episodes:
            obs = torch.from_numpy(ep.obs)
            all_obs = torch.cat([obs, torch.from_numpy(ep.last_obs)[None]])  # [T+1, N, F]
            raw_critic_in = critic_inputs(all_obs, self.centralized)
            values = self.values(raw_critic_in.flatten(0, 1)).reshape(all_obs.shape[0], -1)
            rewards = torch.from_numpy(ep.rewards).float() / scale
            advantages, returns = gae(rewards, values[:-1], values[-1], self.ppo.gamma, self.ppo.gae_lambda)
            masks = torch.from_numpy(ep.masks)
            actions = torch.from_numpy(ep.actions)
            log_probs = policy.distribution(obs.flatten(0, 1), masks.flatten(0, 1)).log_prob(actions.flatten())
            parts.append(RolloutBatch(
                obs=obs.flatten(0, 1), masks=masks.flatten(0, 1), actions=actions.flatten(),
                old_log_probs=log_probs, advantages=advantages.flatten(), returns=returns.flatten(),
                critic_in=raw_critic_in[:-1].flatten(0, 1),
                from_expert=torch.from_numpy(ep.from_expert).flatten(), weight=torch.zeros(actions.numel())))
        return RolloutBatch.concat(parts)

    def reward_scale(self) -> float:
        """What rewards are divided by: the running std of the discounted return (1 without normalization)."""
        return float(torch.sqrt(self.return_norm.var + 1e-8)) if self.ppo.normalize_returns else 1.0

    @torch.no_grad()
    def values(self, raw_critic_in: torch.Tensor) -> torch.Tensor:
        """The critic's values [B] of raw critic inputs [B, C]."""
        return self.critic(self._normalized_critic_in(raw_critic_in))

    def _update_return_norm(self, episodes: list[Episode]) -> None:
        if self.ppo.normalize_returns:
            running = np.concatenate([discounted_running_returns(ep.rewards, self.ppo.gamma).reshape(-1)
                                      for ep in episodes])
            self.return_norm.update(torch.from_numpy(running)[:, None])

    def observe(self, episodes: list[Episode]) -> None:
        """Fold the batch's observations into the normalizer (after the update, so that the old
        log-probs of ``prepare`` are exactly those of the policy that played)."""
        if self.ppo.normalize_obs:
            self.actor.obs_norm.update(torch.from_numpy(np.concatenate([ep.obs.reshape(-1, ep.obs.shape[-1])
                                                                        for ep in episodes])))

    # -- loss and update -------------------------------------------------------------------
    def loss_terms(self, mb: RolloutBatch) -> dict[str, torch.Tensor]:
        """Weighted terms whose sum is minimized; PPO's terms use only the agents' own rows, each row's policy
        term scaled by its importance weight (1 on simulated rows; street rows: trainer.marl.street)."""
        agent = ~mb.from_expert
        dist = self.actor.distribution(mb.obs[agent], mb.masks[agent])
        log_probs = dist.log_prob(mb.actions[agent])
        adv = mb.advantages[agent]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        ratio = torch.exp(log_probs - mb.old_log_probs[agent])
        clipped = torch.clamp(ratio, 1 - self.ppo.clip, 1 + self.ppo.clip)
        norm_critic_in = self._normalized_critic_in(mb.critic_in[agent])
        values = self.critic(norm_critic_in)
        with torch.no_grad():
            self._diagnostics = {
                "approx_kl": float((mb.old_log_probs[agent] - log_probs).mean()),
                "clip_fraction": float(((ratio - 1).abs() > self.ppo.clip).float().mean()),
            }
        terms = {
            "policy": -(mb.is_weight[agent] * torch.min(ratio * adv, clipped * adv)).mean(),
            "value": self.ppo.value_coef * (values - mb.returns[agent]).square().mean(),
            "entropy": -self.ppo.entropy_coef * dist.entropy().mean(),
        }
        if self.imitates:
            terms["imitation"] = self.imitation_term(mb)
        return terms

    def imitation_term(self, mb: RolloutBatch) -> torch.Tensor:
        """Mean over the minibatch's expert rows of w_k · (−log π_θ(a_E | o)); masked phases have
        probability 0 and get no gradient, and the expert's phase is always an allowed one."""
        expert = mb.from_expert
        if not bool(expert.any()):
            return torch.zeros(())
        log_probs = self.actor.distribution(mb.obs[expert], mb.masks[expert]).log_prob(mb.actions[expert])
        return -(mb.weight[expert] * log_probs).mean()

    def _normalized_critic_in(self, critic_in: torch.Tensor) -> torch.Tensor:
        """Critic inputs are stored raw; normalize each agent's observation block with the actor's
        normalizer (the agent-id one-hot of MAPPO is left as is)."""
        norm = self.actor.obs_norm
        if not self.centralized:
            return norm(critic_in)
        n, f = self.n_agents, self.actor.obs_norm.mean.shape[0]
        state = norm(critic_in[:, : n * f].reshape(-1, n, f)).reshape(-1, n * f)
        return torch.cat([state, critic_in[:, n * f:]], dim=-1)

    def update(self, batch: RolloutBatch, lr: float) -> dict[str, float]:
        """Epochs × minibatches of gradient steps; returns the mean of every term and diagnostics."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums: dict[str, float] = {}
        count = 0
        size = max(1, len(batch) // self.ppo.minibatches)
        for _ in range(self.ppo.epochs):
            order = torch.randperm(len(batch), generator=self.generator)
            for start in range(0, len(batch) - size + 1, size):
                terms = self.loss_terms(batch.rows(order[start:start + size]))
                total = sum(terms.values())
                self.optimizer.zero_grad()
                total.backward()  # type: ignore[union-attr]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.ppo.max_grad_norm)
                self.optimizer.step()
                stats = {**{f"loss/{k}": v.item() for k, v in terms.items()}, "loss/total": total.item(),
                         **({"loss/imitation_share": _share(terms, "imitation")} if "imitation" in terms else {}),
                         "grad_norm": float(grad_norm), **self._diagnostics}
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in sums.items()} | {"lr": lr}

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "return_norm": self.return_norm.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.return_norm.load_state_dict(state["return_norm"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


def _share(terms: dict[str, torch.Tensor], name: str) -> float:
    """|term| / Σ|terms|: the share of the loss one term carries."""
    total = sum(abs(v.item()) for v in terms.values())
    return abs(terms[name].item()) / total if total > 0 else 0.0
