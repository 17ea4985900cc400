"""SED's refinement loop: demonstration episodes, per-subset bound scores, feedback, best-per-subset.

Every round plays ``candidates`` demonstration episodes on the same SUMO seed (candidate 0 answers
greedily, the others sample), scores each subset with G_j, ε_j, D_j, B_j, and keeps, per subset,
the best-scoring demonstration of any round. Subsets whose best score did not improve in a round,
or whose bound exceeds τ, get feedback built from the measurements in their next prompt. The loop
stops early once every kept demonstration has B_j ≤ τ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.features import MAX_PHASES, MAX_WAIT_AT, QUEUE_AT
from trainer.env import TrafficSignalEnv
from trainer.marl.checkpoint import actor_from_checkpoint, check_scenario, load_checkpoint
from trainer.marl.config import PPOConfig
from trainer.marl.networks import Actor
from trainer.rollout import Episode, play_episode
from trainer.sed.bounds import (
    external_volatility,
    nonstationarity_bound,
    one_hot,
    policy_divergence,
    subset_score,
)
from trainer.sed.experts import LLMExpert, StepExpert, SubsetContext

# Called after every decision: (round, candidate, fraction of the episode done).
RefineHook = Callable[[int, int, float], None]


# Rounds and candidates when not given: the verified expert searches inside each episode (its look-ahead),
# so one episode is its demonstration; plan and step modes need sampled candidates beside the greedy one.
MODE_DEFAULTS = {"verified": (1, 1), "plan": (3, 2), "step": (3, 2)}


@dataclass(frozen=True)
class RefineConfig:
    rounds: int | None = None  # None: the mode's default (MODE_DEFAULTS)
    candidates: int | None = None
    temperature: float = 1.0  # for candidates 1.. (candidate 0 is greedy)
    lam: float = 1e-4  # λ of the score G − λ·B
    gamma: float = 0.99  # γ of the bound and of G
    tau: float = 1000.0  # stop once every kept B_j <= τ
    seed: int = 0  # SUMO seed of every demonstration episode

    def __post_init__(self) -> None:
        from edge_runtime.errors import RELEDError

        if (self.rounds is not None and self.rounds < 1) or (self.candidates is not None and self.candidates < 1):
            raise RELEDError(f"need at least 1 round and 1 candidate, got {self.rounds} and {self.candidates}")
        if not 0 <= self.gamma < 1:
            raise RELEDError(f"gamma must be in [0, 1), got {self.gamma}")

    def for_mode(self, mode: str) -> RefineConfig:
        """Rounds and candidates filled in with the mode's defaults where not given."""
        rounds, candidates = MODE_DEFAULTS.get(mode, MODE_DEFAULTS["plan"])
        return replace(self, rounds=self.rounds or rounds, candidates=self.candidates or candidates)


@dataclass(frozen=True)
class SubsetScore:
    subset: int
    ret: float  # G_j
    epsilon: float
    divergence: float
    bound: float
    score: float
    mean_queue: float  # vehicles queued at the subset per decision (what the feedback quotes)


@dataclass
class Demonstration:
    round: int
    candidate: int
    episode: Episode
    llm: dict[str, Any]
    scores: list[SubsetScore]
    plans: list[dict[str, Any]] = field(default_factory=list)  # plan/verified: what was in force, per horizon
    schedule: list[tuple[float, tuple[Any, ...]]] = field(default_factory=list)  # the controls from each time
    decisions: list[dict[str, Any]] = field(default_factory=list)  # verified: every subset's pool and winner
    lookahead: dict[str, Any] = field(default_factory=dict)  # verified: look-aheads run, failed, timed out
    switches: list[int] = field(default_factory=list)  # step mode: phase changes per light
    inflow: list[dict[str, list[float]]] = field(default_factory=list)  # per subset, per source, per step

    def summary(self) -> dict[str, Any]:
        scores = [asdict(s) for s in self.scores]
        out = {"round": self.round, "candidate": self.candidate, "avg_delay": self.episode.metrics["avg_delay"],
               "metrics": self.episode.metrics, "mean_bound": float(np.mean([s.bound for s in self.scores])),
               "llm": self.llm, "subsets": scores, "plans": self.plans}
        if self.decisions:
            from trainer.sed.verified import attribution

            out |= {"attribution": attribution(self.decisions), "decisions": self.decisions,
                    "lookahead": self.lookahead}
        return out


def agent_actor(policy: Path | None, env: TrafficSignalEnv, seed: int) -> tuple[Actor, str]:
    """π_θ of the bound: a trained checkpoint, or a freshly initialised actor with the run's seed."""
    if policy is None:
        torch.manual_seed(seed)
        ppo = PPOConfig()
        return Actor(ppo.hidden, ppo.layers, ppo.normalize_obs).eval(), f"fresh actor (seed {seed})"
    data = load_checkpoint(policy)
    check_scenario(data, policy, env.config.scenario, list(env.possible_agents),
                   [i.n_phases for i in env.intersections])
    return actor_from_checkpoint(data), str(policy)


@torch.no_grad()
def agent_probabilities(actor: Actor, obs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """π_θ(·|o) for rows of observations: [rows, MAX_PHASES]."""
    return actor.distribution(torch.from_numpy(np.ascontiguousarray(obs)),
                              torch.from_numpy(np.ascontiguousarray(masks))).probs.numpy()


def score_subset(episode: Episode, ctx: SubsetContext, inflow: np.ndarray, actor: Actor, decision_s: float,
                 config: RefineConfig, index: int | None = None) -> SubsetScore:
    """G_j, ε_j, D_j, B_j and the score of one subset from its agents' rows of ``episode``."""
    agents = list(ctx.agents)
    rewards = episode.rewards[:, agents].sum(axis=1) / ctx.capacity_vehicles  # R_max = 1
    # G_j as the return of a process with this mean reward: the discounted sum from t = 0 would
    # only weigh the first ~1/(1-γ) decisions of the episode.
    ret = float(rewards.mean() / (1 - config.gamma))
    eps = external_volatility(inflow, len(ctx.boundary), decision_s)
    obs = episode.obs[:, agents].reshape(-1, episode.obs.shape[-1])
    masks = episode.masks[:, agents].reshape(-1, MAX_PHASES)
    probs = agent_probabilities(actor, obs, masks)
    div = policy_divergence(probs, one_hot(episode.actions[:, agents].reshape(-1), MAX_PHASES))
    bound = nonstationarity_bound(eps, div, config.gamma)
    mean_queue = float(episode.obs[:, agents, QUEUE_AT:QUEUE_AT + MAX_PHASES].sum(axis=(1, 2)).mean())
    return SubsetScore(ctx.subset.index if index is None else index, ret, eps, div, bound,
                       subset_score(ret, bound, config.lam), mean_queue)


def score_subsets(episode: Episode, contexts: list[SubsetContext], inflow: list[np.ndarray], actor: Actor,
                  decision_s: float, config: RefineConfig) -> list[SubsetScore]:
    return [score_subset(episode, ctx, inflow[j], actor, decision_s, config, j) for j, ctx in enumerate(contexts)]


def feedback_text(ctx: SubsetContext, demo: Demonstration, best: Demonstration, tau: float) -> str:
    """Concrete feedback for one subset from the measurements of its latest demonstration."""
    j = ctx.subset.index
    inflow = demo.inflow[j]
    now, kept = demo.scores[j], best.scores[j]
    lines = [f"Feedback on your last answer: mean queue {now.mean_queue:.1f} vehicles in the group "
             f"(score {now.score:.2f}; the best so far is {kept.score:.2f}, round {best.round})."]
    obs = demo.episode.obs
    waits, queues = [], []
    for label, k, n in zip(ctx.answer.labels, ctx.agents, ctx.answer.n_phases, strict=True):
        for p in range(n):
            waits.append((float(obs[:, k, MAX_WAIT_AT + p].max()), label, p))
            queues.append((float(obs[:, k, QUEUE_AT + p].mean()), label, p))
    wait, label, p = max(waits)
    lines.append(f"Longest wait: {label} phase {p}, {wait:.0f} s: give it green sooner or longer.")
    queue, label, p = max(queues)
    lines.append(f"Longest queues: {label} phase {p}, {queue:.1f} vehicles on average: give it more green.")
    bursty = {s: np.std(v) / max(np.mean(v), 1e-6) for s, v in inflow.items() if len(v) > 1 and np.mean(v) > 0}
    if bursty:
        source = max(bursty, key=bursty.get)
        lines.append(f"Traffic from {source} arrives in bursts: set offsets so these platoons meet a green.")
    if demo.switches:
        flips = [(demo.switches[k], label) for label, k in zip(ctx.answer.labels, ctx.agents, strict=True)]
        count, label = max(flips)
        steps = len(obs)
        if count > steps / 3:
            lines.append(f"{label} changed phase {count} times in {steps} decisions: switch less often.")
    if now.bound > tau:
        lines.append("Your plan differs a lot from what the learning agents do; prefer steady, regular timings.")
    return "\n".join(lines)


@dataclass
class RefineResult:
    demonstrations: list[Demonstration]
    kept: dict[int, Demonstration]  # subset -> its best demonstration
    stopped_early: bool
    feedback: list[dict[int, str]]  # per round: the feedback each subset's prompt carried


def refine(env: TrafficSignalEnv, expert: LLMExpert, actor: Actor, config: RefineConfig,
           hook: RefineHook | None = None, on_round: Callable[[int, list[Demonstration]], None] | None = None,
           ) -> RefineResult:
    expert.attach(env)
    contexts = expert.contexts
    demos: list[Demonstration] = []
    kept: dict[int, Demonstration] = {}
    feedback: dict[int, str] = {}
    feedback_log = []
    stopped_early = False
    config = config.for_mode(expert.mode)
    assert config.rounds is not None and config.candidates is not None
    for r in range(config.rounds):
        feedback_log.append(dict(feedback))
        before = {j: kept[j].scores[j].score for j in kept}
        round_demos = []
        for c in range(config.candidates):
            expert.feedback = dict(feedback)
            expert.temperature = 0.0 if c == 0 else config.temperature
            expert.seed = config.seed * 1000 + r * config.candidates + c
            step_hook = (lambda frac, r=r, c=c: hook(r, c, frac)) if hook else None
            episode = play_episode(env, expert, config.seed, source="expert", on_step=step_hook)
            inflow = [expert.meter.totals(j) for j in range(len(contexts))]
            scores = score_subsets(episode, contexts, inflow, actor, env.timing.delta, config)
            demo = Demonstration(r, c, episode, expert.stats.as_dict(), scores,
                                 plans=list(getattr(expert, "history", [])), schedule=list(expert.schedule),
                                 decisions=list(expert.decisions), lookahead=expert.lookahead_stats(),
                                 switches=expert.switches.tolist() if isinstance(expert, StepExpert) else [],
                                 inflow=[dict(s) for s in expert.meter.per_source])
            round_demos.append(demo)
            for j in range(len(contexts)):
                if j not in kept or scores[j].score > kept[j].scores[j].score:
                    kept[j] = demo
        demos += round_demos
        if on_round:
            on_round(r, round_demos)
        if all(kept[j].scores[j].bound <= config.tau for j in kept):
            stopped_early = r < config.rounds - 1
            break
        for j, ctx in enumerate(contexts):
            improved = j in before and kept[j].scores[j].score > before[j]
            if r == 0 or not improved or kept[j].scores[j].bound > config.tau:
                latest = max(round_demos, key=lambda d, j=j: d.scores[j].score)
                feedback[j] = feedback_text(ctx, latest, kept[j], config.tau)
    return RefineResult(demos, kept, stopped_early, feedback_log)


def kept_columns(result: RefineResult, contexts: list[SubsetContext]) -> dict[str, np.ndarray]:
    """The store's columns: for every subset, its agents' rows from its best demonstration."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in
                                          ("obs", "mask", "action", "reward", "subset", "round", "candidate",
                                           "agent", "step")}
    for j, ctx in enumerate(contexts):
        demo = result.kept[j]
        ep = demo.episode
        steps = np.arange(len(ep.actions))
        for k in ctx.agents:
            parts["obs"].append(ep.obs[:, k])
            parts["mask"].append(ep.masks[:, k])
            parts["action"].append(ep.actions[:, k])
            parts["reward"].append(ep.rewards[:, k])
            parts["step"].append(steps)
            for name, value in (("subset", j), ("round", demo.round), ("candidate", demo.candidate), ("agent", k)):
                parts[name].append(np.full(len(steps), value))
    return {name: np.concatenate(values) for name, values in parts.items()}
