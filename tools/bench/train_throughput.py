#!/usr/bin/env python3
"""Training throughput of `reled train` on cologne8 with 1 and 2 SUMO workers, and RELED's overhead over IPPO.

Why: on a 2-core server, training time is SUMO time plus learner time; this shows how many
agent-steps per second a run gets, how much a second worker buys, and where the time goes.

For each worker count the script trains a fresh IPPO run for ``--updates`` PPO updates
(``episodes_per_update`` = 2 full episodes each, no evaluation until the last update), after a
warm-up update that is not timed (worker start, imports). It reports:

* agent-steps/s over the timed updates (wall-clock, workers and learner together);
* the share of wall time spent collecting episodes (SUMO workers) vs in the learner (PPO update);
* inside the workers, the CPU seconds in SUMO + the environment vs choosing actions (the actor);
* the speed-up of 2 workers over 1 (the peer measured in the same run), without and with ``--overlap``
  (the next batch collected while the learner updates: its time is hidden behind collection);
* with ``--ray``, the same run on 2 Ray actors and Ray's overhead against the 2 local workers;
* RELED (IPPO plus the imitation term) with 2 workers beside IPPO with 2 workers: its per-update overhead,
  i.e. the DTW distances and weights plus the longer learner step (the demonstration rows), as a share of
  IPPO's update wall time (target ≤ 15%). SED passes are not in the timed updates (they run every
  ``sed_every`` updates and are reported by the run as sed_seconds); the demonstrations come from the
  classical tools (``--no-llm``), which does not change their size.

    .venv/bin/python tools/bench/train_throughput.py                # about 2 min
    .venv/bin/python tools/bench/train_throughput.py --updates 2 --episode-seconds 600
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edge_runtime.fileio import atomic_write_text
from trainer.env import EnvConfig
from trainer.marl.config import load_train_config
from trainer.marl.training import TrainingRun
from trainer.sed.generate import GenerateRequest, generate
from trainer.sed.llm import LLMSettings
from trainer.sed.refine import RefineConfig


class _Enough(Exception):
    """Raised by the update hook to end a benchmark run (the workers are closed by ``train``)."""


def make_demos(folder: Path, scenario: str, episode_seconds: float | None) -> Path:
    """Verified demonstrations from the classical tools for the RELED measurement."""
    request = GenerateRequest(env=EnvConfig(scenario=scenario, episode_seconds=episode_seconds), llm=LLMSettings(),
                              refine=RefineConfig(seed=0), no_llm=True, baselines=False)
    generate(request, folder, overwrite=True)
    return folder


def measure(workers: int, updates: int, scenario: str, episode_seconds: float | None, demos: Path | None = None,
            **train: Any) -> dict:
    """Timed figures of ``updates`` updates after one untimed warm-up update (RELED when ``demos`` is given;
    ``train``: more [train] settings, e.g. backend_workers="ray")."""
    with tempfile.TemporaryDirectory(prefix="reled-bench-") as tmp:
        rows: list[dict] = []
        algo = {"algo": "reled"} if demos else {}
        hpo = {"demos": str(demos), "sed_every": 0} if demos else None
        cfg = load_train_config(None, train={"scenario": scenario, "workers": workers, "steps": 10**9,
                                             "eval_every": 10**6, "seed": 0, **algo, **train}, hpo=hpo,
                                env={"episode_seconds": episode_seconds})
        run = TrainingRun.create(Path(tmp) / "run", cfg)

        def stop_after(row: dict) -> None:
            rows.append(row)
            if len(rows) == updates + 1:
                raise _Enough

        with contextlib.suppress(_Enough):
            run.train(stop_after)
    timed = rows[1:]
    steps = timed[-1]["agent_steps"] - rows[0]["agent_steps"]
    wall = sum(r["collect_seconds"] + r["learn_seconds"] for r in timed)
    collect = sum(r["collect_seconds"] for r in timed)
    learn = sum(r["learn_seconds"] for r in timed)
    sim = sum(r["sim_seconds"] for r in timed)
    policy = sum(r["policy_seconds"] for r in timed)
    return {"algo": "reled" if demos else "ippo", "workers": workers, "overlap": bool(train.get("overlap")),
            "backend_workers": train.get("backend_workers", "local"), "updates": len(timed),
            "agent_steps": steps,
            "wall_seconds": wall, "learn_seconds": learn, "collect_seconds": collect,
            "hpo_seconds": sum(r.get("hpo_seconds", 0.0) for r in timed),
            "agent_steps_per_second": steps / wall, "collect_share": collect / wall, "learn_share": learn / wall,
            "worker_sim_seconds": sim, "worker_policy_seconds": policy,
            "worker_sim_share": sim / (sim + policy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="cologne8")
    parser.add_argument("--updates", type=int, default=4, help="timed PPO updates per worker count (default 4)")
    parser.add_argument("--episode-seconds", type=float, default=None, help="shorter episodes (default: full hour)")
    parser.add_argument("--json", type=Path, default=Path("docs/results/bench_train_throughput.json"))
    parser.add_argument("--ray", action="store_true", help="also 2 Ray actors (a private Ray here) beside 2 workers")
    args = parser.parse_args()
    results = [measure(w, args.updates, args.scenario, args.episode_seconds) for w in (1, 2)]
    overlapped = [measure(w, args.updates, args.scenario, args.episode_seconds, overlap=True) for w in (1, 2)]
    if args.ray:  # the same run on 2 Ray actors: Ray's overhead against the 2 local workers measured just before
        results.append(measure(2, args.updates, args.scenario, args.episode_seconds, backend_workers="ray"))
    with tempfile.TemporaryDirectory(prefix="reled-bench-demos-") as tmp:
        demos = make_demos(Path(tmp) / "demos", args.scenario, args.episode_seconds)
        reled = measure(2, args.updates, args.scenario, args.episode_seconds, demos)
    ippo = results[1]
    per_update = ippo["wall_seconds"] / ippo["updates"]
    extra = (reled["hpo_seconds"] + reled["learn_seconds"] - ippo["learn_seconds"]) / reled["updates"]
    overhead = {"hpo_seconds_per_update": reled["hpo_seconds"] / reled["updates"],
                "extra_learn_seconds_per_update": (reled["learn_seconds"] - ippo["learn_seconds"]) / reled["updates"],
                "ippo_update_seconds": per_update, "share_of_ippo_update": extra / per_update,
                "wall_ratio": (reled["wall_seconds"] / reled["updates"]) / per_update}
    rate = [r["agent_steps_per_second"] for r in (*results[:2], *overlapped)]
    speedup = rate[1] / rate[0]
    speedups = {"2_over_1": speedup, "2_overlap_over_1": rate[3] / rate[0],
                "2_overlap_over_1_overlap": rate[3] / rate[2], "overlap_gain_2_workers": rate[3] / rate[1]}
    table = Table(title=f"training throughput, IPPO on {args.scenario} ({args.updates} timed updates of 2 episodes)")
    for col in ("workers", "overlap", "agent-steps/s", "waiting for episodes", "learner (PPO update)",
                "in workers: SUMO + env", "in workers: actor"):
        table.add_column(col, justify="right")
    for r in (*results, *overlapped):
        table.add_row(f"{r['workers']}{' Ray actors' if r['backend_workers'] == 'ray' else ''}",
                      "yes" if r["overlap"] else "no", f"{r['agent_steps_per_second']:,.0f}",
                      f"{r['collect_share']:.0%}",
                      f"{r['learn_share']:.0%}", f"{r['worker_sim_share']:.0%}", f"{1 - r['worker_sim_share']:.0%}")
    console = Console(width=120)
    console.print(table)
    console.print(f"2 workers / 1 worker: {speedup:.2f}x agent-steps/s; with --overlap: "
                  f"{speedups['2_overlap_over_1_overlap']:.2f}x over 1 worker with overlap, "
                  f"{speedups['2_overlap_over_1']:.2f}x over 1 worker without (overlap at 2 workers: "
                  f"{speedups['overlap_gain_2_workers']:.2f}x)")
    ray_overhead = None
    if args.ray:  # the collection is what Ray changes (the learner runs the same code): its time is the overhead
        local, on_ray = results[1], results[-1]
        ray_overhead = {"collect": on_ray["collect_seconds"] / local["collect_seconds"] - 1,
                        "update": local["agent_steps_per_second"] / on_ray["agent_steps_per_second"] - 1}
        console.print(f"2 Ray actors: {on_ray['agent_steps_per_second']:,.0f} agent-steps/s; Ray's overhead over 2 "
                      f"local workers: collection {ray_overhead['collect']:+.1%}, whole updates "
                      f"{ray_overhead['update']:+.1%} (learner noise included)")
    console.print(f"RELED over IPPO (2 workers): DTW + weights {overhead['hpo_seconds_per_update'] * 1000:.0f} ms and "
                  f"learner {overhead['extra_learn_seconds_per_update'] * 1000:+.0f} ms per update = "
                  f"{overhead['share_of_ippo_update']:.1%} of IPPO's {per_update:.2f} s update (target <= 15%); "
                  f"whole updates {overhead['wall_ratio']:.2f}x (collection noise included)")
    atomic_write_text(args.json, json.dumps({"scenario": args.scenario, "runs": [*results, reled, *overlapped],
                                             "speedup_2_over_1": speedup, "speedups": speedups,
                                             "reled_overhead": overhead,
                                             "ray_overhead": ray_overhead},
                                            indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
