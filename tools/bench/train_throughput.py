#!/usr/bin/env python3
"""Training throughput of `reled train` on cologne8 with 1 and 2 SUMO workers.

Why: on a 2-core server, training time is SUMO time plus learner time; this shows how many
agent-steps per second a run gets, how much a second worker buys, and where the time goes.

For each worker count the script trains a fresh IPPO run for ``--updates`` PPO updates
(``episodes_per_update`` = 2 full episodes each, no evaluation until the last update), after a
warm-up update that is not timed (worker start, imports). It reports:

* agent-steps/s over the timed updates (wall-clock, workers and learner together);
* the share of wall time spent collecting episodes (SUMO workers) vs in the learner (PPO update);
* inside the workers, the CPU seconds in SUMO + the environment vs choosing actions (the actor);
* the speed-up of 2 workers over 1 (the peer measured in the same run).

    .venv/bin/python tools/bench/train_throughput.py                # about 2 min
    .venv/bin/python tools/bench/train_throughput.py --updates 2 --episode-seconds 600
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_runtime.fileio import atomic_write_text
from trainer.marl.config import load_train_config
from trainer.marl.training import TrainingRun


class _Enough(Exception):
    """Raised by the update hook to end a benchmark run (the workers are closed by ``train``)."""


def measure(workers: int, updates: int, scenario: str, episode_seconds: float | None) -> dict:
    """Timed figures of ``updates`` updates after one untimed warm-up update."""
    with tempfile.TemporaryDirectory(prefix="reled-bench-") as tmp:
        rows: list[dict] = []
        cfg = load_train_config(None, train={"scenario": scenario, "workers": workers, "steps": 10**9,
                                             "eval_every": 10**6, "seed": 0},
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
    return {"workers": workers, "updates": len(timed), "agent_steps": steps, "wall_seconds": wall,
            "agent_steps_per_second": steps / wall, "collect_share": collect / wall, "learn_share": learn / wall,
            "worker_sim_seconds": sim, "worker_policy_seconds": policy,
            "worker_sim_share": sim / (sim + policy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="cologne8")
    parser.add_argument("--updates", type=int, default=4, help="timed PPO updates per worker count (default 4)")
    parser.add_argument("--episode-seconds", type=float, default=None, help="shorter episodes (default: full hour)")
    parser.add_argument("--json", type=Path, default=Path("docs/results/bench_train_throughput.json"))
    args = parser.parse_args()
    results = [measure(w, args.updates, args.scenario, args.episode_seconds) for w in (1, 2)]
    speedup = results[1]["agent_steps_per_second"] / results[0]["agent_steps_per_second"]
    table = Table(title=f"training throughput, IPPO on {args.scenario} ({args.updates} timed updates of 2 episodes)")
    for col in ("workers", "agent-steps/s", "collecting (SUMO workers)", "learner (PPO update)",
                "in workers: SUMO + env", "in workers: actor"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["workers"]), f"{r['agent_steps_per_second']:,.0f}", f"{r['collect_share']:.0%}",
                      f"{r['learn_share']:.0%}", f"{r['worker_sim_share']:.0%}", f"{1 - r['worker_sim_share']:.0%}")
    console = Console(width=120)
    console.print(table)
    console.print(f"2 workers / 1 worker: {speedup:.2f}x agent-steps/s")
    atomic_write_text(args.json, json.dumps({"scenario": args.scenario, "runs": results,
                                             "speedup_2_over_1": speedup}, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
