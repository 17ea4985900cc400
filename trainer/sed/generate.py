"""`reled demos generate` without the CLI: baselines, the refinement loop, the store and its manifest."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES
from trainer.controllers import make_controller
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.evaluate import evaluate
from trainer.marl.networks import Actor
from trainer.sed.experts import DEFAULT_HORIZON_S, MODES, make_expert
from trainer.sed.llm import LLMSettings, open_backend
from trainer.sed.lookahead import DEFAULT_TIMEOUT_S
from trainer.sed.prompts import PROMPT_VERSIONS
from trainer.sed.refine import Demonstration, RefineConfig, RefineHook, RefineResult, agent_actor, kept_columns, refine
from trainer.sed.replay import replay_kept
from trainer.sed.store import check_free, write_demos
from trainer.sed.verified import DEFAULT_LOOKAHEAD_WORKERS, attribution

BASELINES = ("fixed", "greedy", "max-pressure")


@dataclass(frozen=True)
class GenerateRequest:
    env: EnvConfig
    llm: LLMSettings
    refine: RefineConfig
    mode: str = "verified"
    subset_size: int = 4
    horizon_s: float = DEFAULT_HORIZON_S
    policy: Path | None = None  # agent policy for D_j; None: a fresh actor (what training starts from)
    baselines: bool = True
    no_llm: bool = False  # verified mode without the model: the classical tools only (every figure's twin)
    follow_llm: bool = False  # verified mode: run the LLM's strategy unverified (what the LLM alone would give)
    lookahead_workers: int = DEFAULT_LOOKAHEAD_WORKERS
    lookahead_timeout: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RELEDError(f"unknown --mode {self.mode!r}: choose {', '.join(MODES)}")
        if self.no_llm and self.mode != "verified":
            raise RELEDError(f"--no-llm needs --mode verified ({self.mode} mode is the LLM alone)")
        if self.follow_llm and (self.no_llm or self.mode != "verified"):
            raise RELEDError("--follow-llm needs --mode verified and the model (not --no-llm)")


def run_baselines(env: TrafficSignalEnv, seed: int) -> dict[str, dict[str, float]]:
    """Fixed-time, greedy and max-pressure on the demonstrations' own seed and settings."""
    results = evaluate(env.scenario, [make_controller(n) for n in BASELINES], [seed], env.config)
    return {r.controller: r.metrics.as_dict() for r in results}


def generate(request: GenerateRequest, out: Path, overwrite: bool, hook: RefineHook | None = None,
             on_round: Callable[[int, list[Demonstration]], None] | None = None,
             actor: Actor | None = None) -> dict[str, Any]:
    """Run SED and write the store; returns the manifest. Nothing is written unless everything succeeded.

    ``actor`` is π_θ of the bound when given (a training run's current policy), else ``request.policy``.
    """
    started = time.perf_counter()
    check_free(out, overwrite)
    verified = request.mode == "verified"
    env = TrafficSignalEnv(request.env, with_inflow=True, with_pressure=True, snapshots=verified)
    backend = None if request.no_llm else open_backend(request.llm)
    expert = None
    try:
        seed = request.refine.seed
        actor, actor_label = (actor, "the training run's current policy") if actor is not None else \
            agent_actor(request.policy, env, seed)
        baselines = run_baselines(env, seed) if request.baselines else {}
        options: dict[str, Any] = {"subset_size": request.subset_size, "horizon_s": request.horizon_s,
                                   "max_tokens": request.llm.max_tokens}
        if verified:
            options |= {"actor": actor, "score_config": request.refine, "lookahead_workers": request.lookahead_workers,
                        "lookahead_timeout": request.lookahead_timeout, "follow_llm": request.follow_llm}
        expert = make_expert(backend, request.mode, **options)
        result = refine(env, expert, actor, request.refine, hook, on_round)
        kept_replay = replay_kept(env, result, expert.contexts, seed)
        manifest = build_manifest(request, env, backend, expert.contexts, result, baselines, actor_label)
        manifest["kept_replay"] = kept_replay
        manifest["wall_seconds"] = time.perf_counter() - started  # what the demonstrations cost, SUMO and LLM
        manifest = write_demos(out, manifest, kept_columns(result, expert.contexts), overwrite)
    finally:
        if expert is not None:
            expert.close()
        if backend is not None:
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
    decisions = [d for demo in demos for d in demo.decisions]
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "scenario": env.scenario.name, "demand": env.config.demand, "seed": request.refine.seed,
        "episode_seconds": env.end_time - env.scenario.begin, "reward": env.config.reward,
        "timing": asdict(env.timing), "agents": list(env.possible_agents),
        "n_phases": [i.n_phases for i in env.intersections], "action_size": MAX_PHASES,
        "mode": request.mode, "prompt_version": PROMPT_VERSIONS[request.mode],
        "model": {"backend": backend.description if backend else "none (--no-llm: the classical tools only)",
                  "sha256": backend.model_sha256 if backend else None, "file": str(model_file) if model_file else None},
        "no_llm": request.no_llm, "follow_llm": request.follow_llm,
        "llm_settings": {k: v for k, v in asdict(request.llm).items() if k != "extra"},
        "config": {**asdict(request.refine.for_mode(request.mode)), "subset_size": request.subset_size,
                   "horizon_s": request.horizon_s, "lookahead_workers": request.lookahead_workers},
        "agent_policy": actor_label,
        "subsets": [{"name": c.subset.name, "lights": list(c.subset.lights), "boundary_lanes": list(c.boundary)}
                    for c in contexts],
        "baselines": baselines,
        "rounds": rounds,
        "kept": kept,
        "kept_mean_bound": float(np.mean([k["bound"] for k in kept])),
        "stopped_early": result.stopped_early,
        "llm_totals": totals,
        **({"attribution": attribution(decisions)} if decisions else {}),
    }
