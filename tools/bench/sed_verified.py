#!/usr/bin/env python3
"""Cost of the verified expert: one demonstration episode, and what a look-ahead costs.

Why: verified mode plays every candidate of every subset forward from the current state at every
horizon, so its cost is look-ahead time plus LLM time. Targets (issue 12): one verified demonstration
episode of cologne8 (1 h) in <= 120 s on 2 cores with the embedded model, Orlando in <= 180 s.

Measured here, on each net:
- the look-ahead mechanics: saving the state, loading it back into the running SUMO (libsumo
  ``simulation.loadState``) against starting a fresh SUMO from it (``--load-state``, what the workers
  do), and whether each gives the same 5 minutes of traffic as the episode itself (the peer);
- one whole verified demonstration episode (`reled demos generate`'s expert) with the embedded model
  and its --no-llm twin: wall time, LLM seconds, look-ahead count and seconds, delay beside the
  heuristics on the same seed.

    .venv/bin/python tools/bench/sed_verified.py                        # cologne8 and orlando, about 8 min
    .venv/bin/python tools/bench/sed_verified.py --scenarios grid2x2 --episode-seconds 600 --no-llm --json o.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge_runtime.fileio import atomic_write_text
from trainer.controllers import make_controller
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.evaluate import controller_env, evaluate
from trainer.rollout import play_episode
from trainer.scenarios import get_scenario
from trainer.sed.experts import make_expert
from trainer.sed.llm import LLMSettings, open_backend
from trainer.sed.lookahead import lookahead_config
from trainer.sed.tools import ToolController, adaptive
from trainer.sed.verified import attribution

TARGETS_S = {"cologne8": 120.0, "orlando": 180.0}


def mechanics(scenario: str, at_decision: int, decisions: int) -> dict:
    """Save at a decision, then continue three ways: the episode itself, loadState in the same SUMO,
    a fresh SUMO started from the state. Times and whether the traffic matches the episode's."""
    env = TrafficSignalEnv(lookahead_config(EnvConfig(scenario=scenario)))
    n = len(env.possible_agents)
    controller = ToolController([adaptive("max-pressure")] * n, [env.scenario.begin] * n)
    controller.attach(env)

    def run(obs: dict, infos: dict) -> list[list[float]]:
        rows = []
        for _ in range(decisions):
            obs, rewards, _t, _tr, infos = env.step(controller.act(obs, infos))
            rows.append([rewards[a] for a in env.possible_agents])
        return rows

    with tempfile.TemporaryDirectory() as tmp:
        try:
            obs, infos = env.reset(seed=0)
            for _ in range(at_decision):
                obs, _r, _t, _tr, infos = env.step(controller.act(obs, infos))
            start = time.perf_counter()
            snapshot = env.snapshot(Path(tmp) / "state.xml")
            save_s = time.perf_counter() - start
            truth = run(obs, infos)
            # the same SUMO loads the state back: the rejected alternative, so its environment-side
            # restore is done by hand here (what TrafficSignalEnv.restore does after starting SUMO)
            start = time.perf_counter()
            env.api.simulation.loadState(str(snapshot.state_file))
            in_process_load_s = time.perf_counter() - start
            env.shields = copy.deepcopy(list(snapshot.shields))
            env._time, env._shown = snapshot.time, [None] * n
            env._apply_signals()
            env.readings.lanes.seen = [set(s) for s in snapshot.seen]
            env.readings.read()
            in_process = run(env._observe(), env._infos())
            start = time.perf_counter()
            fresh_obs, fresh_infos = env.restore(snapshot)
            fresh_load_s = time.perf_counter() - start
            start = time.perf_counter()
            fresh = run(fresh_obs, fresh_infos)
            run_s = time.perf_counter() - start
            state_bytes = snapshot.state_file.stat().st_size
        finally:
            env.close()
    truth_q = float(-np.sum(truth))
    return {"scenario": scenario, "save_s": save_s, "in_process_load_s": in_process_load_s,
            "fresh_start_load_s": fresh_load_s, "lookahead_run_s": run_s, "state_bytes": state_bytes,
            "decisions": decisions, "episode_queued": truth_q,
            "in_process_queued": float(-np.sum(in_process)), "fresh_queued": float(-np.sum(fresh)),
            "in_process_exact": in_process == truth, "fresh_exact": fresh == truth}


def episode(scenario: str, use_llm: bool, episode_seconds: float | None, workers: int) -> dict:
    """One verified demonstration episode, timed, with the heuristics on the same seed beside it."""
    config = EnvConfig(scenario=scenario, episode_seconds=episode_seconds)
    resolved = get_scenario(scenario)
    backend = open_backend(LLMSettings()) if use_llm else None
    expert = make_expert(backend, "verified", lookahead_workers=workers)
    try:
        start = time.perf_counter()
        with controller_env(resolved, expert, config) as env:
            metrics = play_episode(env, expert, 0, source="expert").metrics
            lookahead = expert.lookahead_stats()
        wall = time.perf_counter() - start
    finally:
        if backend is not None:
            backend.close()
    heuristics = {r.controller: r.metrics.avg_delay for r in
                  evaluate(resolved, [make_controller(n) for n in ("fixed", "greedy", "max-pressure")], [0], config)}
    stats = expert.total_stats()
    return {"scenario": scenario, "llm": use_llm, "wall_s": wall, "avg_delay": metrics["avg_delay"],
            "heuristics": heuristics, "llm_seconds": stats.seconds, "llm_calls": stats.calls,
            "llm_valid": stats.valid, "lookahead": lookahead, "attribution": attribution(expert.decisions),
            "target_s": TARGETS_S.get(scenario)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["cologne8", "orlando"])
    parser.add_argument("--episode-seconds", type=float, default=None, help="default: the scenario's whole episode")
    parser.add_argument("--no-llm", action="store_true", help="only the tools-only twin (no model needed)")
    parser.add_argument("--workers", type=int, default=2, help="look-ahead worker processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    console = Console()
    mech = [mechanics(s, 60, 30) for s in args.scenarios]
    table = Table(title="look-ahead mechanics (save at decision 60, 30 decisions forward)")
    for col in ("net", "save (ms)", "loadState in the running SUMO (ms)", "same traffic", "fresh SUMO from state (ms)",
                "same traffic", "30 decisions (ms)", "state (MB)"):
        table.add_column(col, justify="right")
    for m in mech:
        table.add_row(m["scenario"], f"{m['save_s'] * 1e3:.0f}", f"{m['in_process_load_s'] * 1e3:.0f}",
                      f"{m['in_process_exact']} ({m['in_process_queued']:.0f} vs {m['episode_queued']:.0f})",
                      f"{m['fresh_start_load_s'] * 1e3:.0f}",
                      f"{m['fresh_exact']} ({m['fresh_queued']:.0f} vs {m['episode_queued']:.0f})",
                      f"{m['lookahead_run_s'] * 1e3:.0f}", f"{m['state_bytes'] / 1e6:.1f}")
    console.print(table)
    runs = [episode(s, use_llm, args.episode_seconds, args.workers)
            for s in args.scenarios for use_llm in ([False] if args.no_llm else [False, True])]
    table = Table(title="one verified demonstration episode")
    for col in ("net", "LLM", "wall (s)", "target (s)", "LLM s", "calls (valid)", "look-aheads", "look-ahead s",
                "delay (s)", "greedy", "max-pressure", "LLM wins"):
        table.add_column(col, justify="right")
    for r in runs:
        la, a = r["lookahead"], r["attribution"]
        table.add_row(r["scenario"], "yes" if r["llm"] else "no", f"{r['wall_s']:.0f}",
                      f"{r['target_s']:.0f}" if r["target_s"] else "–", f"{r['llm_seconds']:.0f}",
                      f"{r['llm_calls']} ({r['llm_valid']})", f"{la['tasks']} ({la['failed']} failed)",
                      f"{la['seconds']:.0f}", f"{r['avg_delay']:.1f}", f"{r['heuristics']['greedy']:.1f}",
                      f"{r['heuristics']['max-pressure']:.1f}", f"{a['llm_wins']}/{a['choices']}")
    console.print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps({"mechanics": mech, "episodes": runs}, indent=1))


if __name__ == "__main__":
    main()
