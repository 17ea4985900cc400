"""Run RELED's experiments (docs/results/reled.md): training runs, reference lines, zero-shot evaluations.

Every step is a `reled` command; a step whose result exists is skipped and a training run that stopped
is resumed (`reled train --resume`), so the suite can be stopped at any point and continued. Each step's
command, wall-clock time and machine go to OUT/log.jsonl. The report (tools/experiments/report.py) is
written from whatever has finished. The runner is `reled sweep`'s (trainer.sweep): here one step after
another, or with --ray-address as Ray tasks over a cluster's nodes (docs/scale_out.md).

    .venv/bin/python tools/experiments/run.py                 # the full suite (many hours on 2 cores)
    .venv/bin/python tools/experiments/run.py --quick         # CI's smoke profile: minutes
    .venv/bin/python tools/experiments/run.py --only a --algos ippo,mappo --scenarios cologne8
    .venv/bin/python tools/experiments/run.py --ray-address auto   # on the Ray cluster this machine joined
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from plan import PROFILES, Run

from edge_runtime.errors import RELEDError
from trainer.sweep.execute import Log, run_here, run_on_ray
from trainer.sweep.steps import Planner

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RELED_SHARED", ROOT.parent / "shared"))
# Scenarios that are imported rather than built in, and how (each machine imports it before its first step on it).
IMPORTS = {
    "orlando": ["--osm", str(SHARED / "data/osm/orlando/orlando_ucf.osm")],
    "hong_kong": ["--net", str(SHARED / "data/sumo/hong_kong_ymt/ymt_lefthand.net.xml"), "--congested-scale", "2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smoke profile (minutes) instead of the full suite")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default out/experiments[-quick])")
    parser.add_argument("--only", default="a,e,resco,c,d", help="experiments to run, in this order (default all)")
    parser.add_argument("--algos", default="ippo,mappo,reled", help="algorithms to run (default all)")
    parser.add_argument("--scenarios", default=None, help="only these scenarios (default all)")
    parser.add_argument("--demands", default="moderate,congested", help="only these demands (default both)")
    parser.add_argument("--seeds", default=None, help="only these training seeds (default all)")
    parser.add_argument("--workers", type=int, default=2, help="SUMO workers per training run (default 2)")
    parser.add_argument("--ray-address", default=None,
                        help="run the steps as Ray tasks: local (a private Ray here), auto or HOST:PORT of a "
                             "cluster (default: no Ray, one step after another)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    profile = PROFILES["quick" if args.quick else "full"]()
    out = (args.out or ROOT / "out" / ("experiments-quick" if args.quick else "experiments")).resolve()
    planner = Planner(out, workers=args.workers, eval_every=profile.eval_every, eval_episodes=profile.eval_episodes,
                      sed_every=profile.sed_every, heuristics_episodes=profile.heuristics_episodes, root=ROOT,
                      imports=IMPORTS)
    only, algos = args.only.split(","), args.algos.split(",")
    scenarios = args.scenarios.split(",") if args.scenarios else None
    demands = args.demands.split(",")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    for experiment in only:
        for run in profile.runs:
            if run.experiment != experiment or run.algo not in algos or run.demand not in demands:
                continue
            if (scenarios and run.scenario not in scenarios) or (seeds is not None and run.seed not in seeds):
                continue
            planner.add_run(run)
        if experiment == "d":
            for train_s, train_d, eval_s, eval_d in profile.zero_shot:
                if scenarios and not {train_s, eval_s} <= set(scenarios):
                    continue
                planner.add_heuristics(Run("d", eval_s, eval_d, "ippo", 0, 0))
                for algo in algos:
                    for seed in sorted({r.seed for r in profile.runs}):
                        planner.add_zero_shot(Run("a", train_s, train_d, algo, seed, 0), eval_s, eval_d)
    steps = list(planner.steps.values())
    log = Log(out)
    if args.dry_run:
        for step in steps:
            print("+ reled", " ".join(step.arguments()), "(done)" if step.done() else "", flush=True)
    elif args.ray_address:
        try:
            run_on_ray(steps, ROOT, log, args.ray_address)
        except RELEDError as exc:
            sys.exit(f"error: {exc}")
    else:
        run_here(steps, ROOT, log)
    print(f"done: {out}" + (f"; failed: {', '.join(log.failed)}" if log.failed else ""), flush=True)
    if log.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
