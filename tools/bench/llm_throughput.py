#!/usr/bin/env python3
"""LLM expert throughput on cologne8 with the embedded model on this machine's CPU.

Why: SED's cost is LLM time. `step` mode calls the model once per subset per decision, so it
needs agent-decisions per second; `plan` mode calls it once per subset per 15 minutes, so what
matters is the LLM time of a whole demonstration episode. Targets: >= 5 agent-decisions/s in
step mode; a plan-mode episode of cologne8 in < 60 s of LLM time.

Step mode runs the real expert on real cologne8 states (prompts built from the live simulation)
for ``--decisions`` decisions, with prefix reuse on and then off (the peer in the same run).
Figures: prompt tokens evaluated per second and generated tokens per second (llama.cpp's own
counters; with prefix reuse fewer prompt tokens need evaluating), calls/s, agent-decisions/s.
Plan mode plays one whole episode and reports its LLM seconds.

    .venv/bin/python tools/bench/llm_throughput.py                       # about 3 min
    .venv/bin/python tools/bench/llm_throughput.py --decisions 5 --no-plan --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_runtime.fileio import atomic_write_text
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.rollout import play_episode
from trainer.sed.experts import make_expert
from trainer.sed.llm import LlamaCppBackend, resolve_model


def step_mode(scenario: str, model: str, threads: int, decisions: int, prefix_reuse: bool) -> dict:
    backend = LlamaCppBackend(resolve_model(model), threads, 4096, 0, prefix_reuse, timeout=120)
    env = TrafficSignalEnv(EnvConfig(scenario=scenario, with_inflow=True))
    try:
        expert = make_expert(backend, "step")
        expert.attach(env)
        before = backend.perf_counters()
        play_episode(env, expert, 0, source="expert", max_decisions=decisions)
        after = backend.perf_counters()
    finally:
        backend.close()
        env.close()
    stats = expert.stats
    p_ms, p_n, g_ms, g_n = (a - b for a, b in zip(after, before, strict=True))
    return {"mode": "step", "prefix_reuse": prefix_reuse, "calls": stats.calls, "valid": stats.valid,
            "llm_seconds": stats.seconds, "agent_decisions": decisions * len(env.possible_agents),
            "prompt_tokens": stats.prompt_tokens, "prompt_tokens_evaluated": p_n,
            "prompt_eval_tok_s": p_n / (p_ms / 1000) if p_ms else 0.0,
            "generated_tokens": g_n, "generated_tok_s": g_n / (g_ms / 1000) if g_ms else 0.0,
            "calls_s": stats.calls / stats.seconds,
            "agent_decisions_s": decisions * len(env.possible_agents) / stats.seconds}


def plan_episode(scenario: str, model: str, threads: int) -> dict:
    backend = LlamaCppBackend(resolve_model(model), threads, 4096, 0, True, timeout=120)
    env = TrafficSignalEnv(EnvConfig(scenario=scenario, with_inflow=True))
    try:
        expert = make_expert(backend, "plan")
        expert.attach(env)
        start = time.perf_counter()
        episode = play_episode(env, expert, 0, source="expert")
        wall = time.perf_counter() - start
    finally:
        backend.close()
        env.close()
    stats = expert.stats
    return {"mode": "plan", "calls": stats.calls, "valid": stats.valid, "llm_seconds": stats.seconds,
            "episode_wall_seconds": wall, "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.completion_tokens, "avg_delay": episode.metrics["avg_delay"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="cologne8")
    parser.add_argument("--model", default="smollm2", help="embedded model name or GGUF path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decisions", type=int, default=30, help="step-mode decisions per configuration")
    parser.add_argument("--no-plan", action="store_true", help="skip the plan-mode episode")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    console = Console()
    rows = [step_mode(args.scenario, args.model, args.threads, args.decisions, reuse) for reuse in (True, False)]
    table = Table(title=f"step mode on {args.scenario}: {args.decisions} decisions, {args.model}, "
                        f"{args.threads} threads")
    for col in ("prefix reuse", "calls", "valid", "prompt tok (evaluated)", "prompt eval tok/s", "generated tok/s",
                "calls/s", "agent-decisions/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row("on" if r["prefix_reuse"] else "off", str(r["calls"]), str(r["valid"]),
                      f"{r['prompt_tokens']} ({r['prompt_tokens_evaluated']})", f"{r['prompt_eval_tok_s']:.0f}",
                      f"{r['generated_tok_s']:.0f}", f"{r['calls_s']:.2f}", f"{r['agent_decisions_s']:.1f}")
    console.print(table)
    on, off = rows
    console.print(f"prefix reuse: {on['agent_decisions_s'] / off['agent_decisions_s']:.2f}x agent-decisions/s "
                  f"(target >= 5/s: {'met' if on['agent_decisions_s'] >= 5 else 'NOT met'})")
    result = {"step": rows}
    if not args.no_plan:
        plan = plan_episode(args.scenario, args.model, args.threads)
        result["plan"] = plan
        console.print(f"plan mode, one whole {args.scenario} episode: {plan['calls']} calls "
                      f"({plan['valid']} valid), {plan['llm_seconds']:.1f} s of LLM time "
                      f"(target < 60 s: {'met' if plan['llm_seconds'] < 60 else 'NOT met'}), "
                      f"{plan['episode_wall_seconds']:.1f} s wall with SUMO")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
