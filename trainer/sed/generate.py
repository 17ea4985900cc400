"""`reled demos generate` without the CLI: baselines, the refinement loop, the store and its manifest."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.features import MAX_PHASES
from trainer.controllers import make_controller
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.evaluate import evaluate
from trainer.marl.checkpoint import actor_from_checkpoint, check_scenario, load_checkpoint
from trainer.marl.config import PPOConfig
from trainer.marl.networks import Actor
from trainer.sed.experts import DEFAULT_HORIZON_S, make_expert
from trainer.sed.llm import LLMSettings, open_backend
from trainer.sed.prompts import PROMPT_VERSIONS
from trainer.sed.refine import Demonstration, RefineConfig, RefineHook, RefineResult, kept_columns, refine
from trainer.sed.store import check_free, write_demos

BASELINES = ("fixed", "max-pressure")


@dataclass(frozen=True)
class GenerateRequest:
    env: EnvConfig
    llm: LLMSettings
    refine: RefineConfig
    mode: str = "plan"
    subset_size: int = 4
    horizon_s: float = DEFAULT_HORIZON_S
    policy: Path | None = None  # agent policy for D_j; None: a fresh actor (what training starts from)
    baselines: bool = True


def agent_actor(policy: Path | None, env: TrafficSignalEnv, seed: int) -> tuple[Actor, str]:
    """π_θ of the bound: a trained checkpoint, or a freshly initialised actor with the run's seed."""
    if policy is None:
        torch.manual_seed(seed)
        ppo = PPOConfig()
        return Actor(ppo.hidden, ppo.layers, ppo.normalize_obs).eval(), f"fresh actor (seed {seed})"
    data = load_checkpoint(policy)
    check_scenario(data, policy, env.scenario.name, list(env.possible_agents),
                   [i.n_phases for i in env.intersections])
    return actor_from_checkpoint(data), str(policy)


def run_baselines(env: TrafficSignalEnv, seed: int) -> dict[str, dict[str, float]]:
    """Fixed-time and max-pressure on the demonstrations' own seed and settings."""
    results = evaluate(env.scenario, [make_controller(n) for n in BASELINES], [seed], env.config)
    return {r.controller: r.metrics.as_dict() for r in results}


def generate(request: GenerateRequest, out: Path, overwrite: bool, hook: RefineHook | None = None,
             on_round: Callable[[int, list[Demonstration]], None] | None = None) -> dict[str, Any]:
    """Run SED and write the store; returns the manifest. Nothing is written unless everything succeeded."""
    check_free(out, overwrite)
    env = TrafficSignalEnv(request.env, with_inflow=True)
    backend = open_backend(request.llm)
    try:
        actor, actor_label = agent_actor(request.policy, env, request.refine.seed)
        baselines = run_baselines(env, request.refine.seed) if request.baselines else {}
        expert = make_expert(backend, request.mode, subset_size=request.subset_size, horizon_s=request.horizon_s,
                             max_tokens=request.llm.max_tokens)
        result = refine(env, expert, actor, request.refine, hook, on_round)
        manifest = build_manifest(request, env, backend, expert.contexts, result, baselines, actor_label)
        manifest = write_demos(out, manifest, kept_columns(result, expert.contexts), overwrite)
    finally:
        backend.close()
        env.close()
    return manifest


def build_manifest(request: GenerateRequest, env: TrafficSignalEnv, backend: Any, contexts: list,
                   result: RefineResult, baselines: dict[str, dict[str, float]], actor_label: str) -> dict[str, Any]:
    demos = result.demonstrations
    rounds = []
    for r in sorted({d.round for d in demos}):
        in_round = [d.summary() for d in demos if d.round == r]
        best = min(in_round, key=lambda d: d["avg_delay"])
        rounds.append({"round": r, "best_avg_delay": best["avg_delay"], "best_mean_bound": best["mean_bound"],
                       "feedback": {str(j): text for j, text in result.feedback[r].items()},
                       "candidates": in_round})
    totals = {key: sum(d.llm[key] for d in demos) for key in
              ("calls", "valid", "invalid", "late", "failed", "prompt_tokens", "completion_tokens", "seconds")}
    totals["validity"] = totals["valid"] / totals["calls"] if totals["calls"] else 1.0
    kept = [{"subset": j, "round": d.round, "candidate": d.candidate, **asdict(d.scores[j])}
            for j, d in sorted(result.kept.items())]
    model_file = getattr(backend, "model_path", None)
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scenario": env.scenario.name, "demand": env.config.demand, "seed": request.refine.seed,
        "episode_seconds": env.end_time - env.scenario.begin, "reward": env.config.reward,
        "timing": asdict(env.timing), "agents": list(env.possible_agents),
        "n_phases": [i.n_phases for i in env.intersections], "action_size": MAX_PHASES,
        "mode": request.mode, "prompt_version": PROMPT_VERSIONS[request.mode],
        "model": {"backend": backend.description, "sha256": backend.model_sha256,
                  "file": str(model_file) if model_file else None},
        "llm_settings": {k: v for k, v in asdict(request.llm).items() if k != "extra"},
        "config": {**asdict(request.refine), "subset_size": request.subset_size, "horizon_s": request.horizon_s},
        "agent_policy": actor_label,
        "subsets": [{"name": c.subset.name, "lights": list(c.subset.lights), "boundary_lanes": list(c.boundary)}
                    for c in contexts],
        "baselines": baselines,
        "rounds": rounds,
        "kept": kept,
        "kept_mean_bound": float(np.mean([k["bound"] for k in kept])),
        "stopped_early": result.stopped_early,
        "llm_totals": totals,
    }
