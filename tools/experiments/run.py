"""Run RELED's experiments (docs/results/reled.md): training runs, reference lines, zero-shot evaluations.

Every step is a `reled` command; a step whose result exists is skipped and a training run that stopped
is resumed (`reled train --resume`), so the suite can be stopped at any point and continued. Each step's
command, wall-clock time and machine go to OUT/log.jsonl. The report (tools/experiments/report.py) is
written from whatever has finished.

    .venv/bin/python tools/experiments/run.py                 # the full suite (many hours on 2 cores)
    .venv/bin/python tools/experiments/run.py --quick         # CI's smoke profile: minutes
    .venv/bin/python tools/experiments/run.py --only a --algos ippo,mappo --scenarios cologne8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from plan import PROFILES, Profile, Run

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("RELED_SHARED", ROOT.parent / "shared"))
# Scenarios that are imported rather than built in, and how (the first run that needs one imports it).
IMPORTS = {
    "orlando": ["--osm", str(SHARED / "data/osm/orlando/orlando_ucf.osm")],
    "hong_kong": ["--net", str(SHARED / "data/sumo/hong_kong_ymt/ymt_lefthand.net.xml"), "--congested-scale", "2"],
}
HEURISTICS = "fixed,greedy,max-pressure"


def reled() -> str:
    return str(Path(sys.executable).with_name("reled"))


def machine() -> dict[str, object]:
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


class Runner:
    def __init__(self, out: Path, profile: Profile, workers: int, dry_run: bool):
        self.out, self.profile, self.workers, self.dry_run = out, profile, workers, dry_run
        self.failed: list[str] = []

    def step(self, key: str, cmd: list[str]) -> bool:
        """Run one command and log it; a failure is recorded and the suite goes on with the next step."""
        print("+", " ".join(cmd), flush=True)
        if self.dry_run:
            return True
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        entry = {"step": key, "cmd": cmd, "rc": rc, "seconds": round(time.perf_counter() - start, 1),
                 "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine()}
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "log.jsonl").open("a") as log:
            log.write(json.dumps(entry) + "\n")
        if rc != 0:
            self.failed.append(key)
            print(f"! {key} failed (exit {rc}); going on", flush=True)
        return rc == 0

    def scenario(self, name: str) -> bool:
        if name not in IMPORTS:
            return True
        return self.step(f"import-{name}", [reled(), "scenario", "import", *IMPORTS[name], "--name", name,
                                           "--if-missing"])

    def timing_args(self, run: Run) -> list[str]:
        return ["--config", str(ROOT / run.timing)] if run.timing else []

    def heuristics(self, run: Run) -> None:
        target = self.out / "heuristics" / f"{run.scenario}{'-resco' if run.timing else ''}-{run.demand}.json"
        if target.is_file():
            return
        self.step(f"heuristics-{target.stem}", [
            reled(), "eval", "--scenario", run.scenario, "--demand", run.demand, "--controller", HEURISTICS,
            "--seeds", str(self.profile.heuristics_episodes), "--json", str(target), *self.timing_args(run)])

    def demos(self, run: Run) -> Path | None:
        """The verified demonstrations a RELED run starts from (one store per scenario, demand, seed)."""
        folder = self.out / "demos" / run.demos_key
        if (folder / "manifest.json").is_file():
            return folder
        cmd = [reled(), "demos", "generate", "--scenario", run.scenario, "--demand", run.demand,
               "--seed", str(run.seed), "--out", str(folder), "--force", *self.timing_args(run)]
        if run.tools_only:
            cmd += ["--no-llm"]
        if run.unbounded:
            cmd += ["--lambda", "0"]
        return folder if self.step(f"demos-{run.demos_key}", cmd) else None

    def train(self, run: Run) -> None:
        folder = self.out / "runs" / run.key
        summary = folder / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("finished"):
            return
        if (folder / "latest.pt").is_file():
            self.step(run.key, [reled(), "train", "--resume", str(folder), "--workers", str(self.workers)])
            return
        cmd = [reled(), "train", "--algo", run.algo, "--scenario", run.scenario, "--demand", run.demand,
               "--seed", str(run.seed), "--steps", str(run.steps), "--workers", str(self.workers),
               "--runs-dir", str(folder.parent), "--name", run.key, "--eval-every", str(self.profile.eval_every),
               "--eval-episodes", str(self.profile.eval_episodes), *self.timing_args(run)]
        if run.algo == "reled":
            demos = self.demos(run)
            if demos is None:
                return
            cmd += ["--demos", str(demos), "--sed-every", str(self.profile.sed_every), *run.flags]
        self.step(run.key, cmd)

    def zero_shot(self, train_scenario: str, train_demand: str, scenario: str, demand: str,
                  algos: list[str]) -> None:
        for algo in algos:
            for seed in sorted({r.seed for r in self.profile.runs}):
                key = f"{algo}-{train_scenario}-{train_demand}-s{seed}"
                policy = self.out / "runs" / key / "latest.pt"
                target = self.out / "zero_shot" / f"{key}--{scenario}-{demand}.json"
                if target.is_file() or not policy.is_file():
                    continue
                self.step(f"zero-shot-{target.stem}", [  # the heuristics on the same seeds are in heuristics/
                    reled(), "eval", "--scenario", scenario, "--demand", demand, "--policy", str(policy),
                    "--zero-shot", "--seeds", str(self.profile.heuristics_episodes), "--json", str(target)])


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
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    profile = PROFILES["quick" if args.quick else "full"]()
    out = args.out or ROOT / "out" / ("experiments-quick" if args.quick else "experiments")
    runner = Runner(out, profile, args.workers, args.dry_run)
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
            if runner.scenario(run.scenario):
                runner.heuristics(run)
                runner.train(run)
        if experiment == "d":
            for train_s, train_d, eval_s, eval_d in profile.zero_shot:
                if scenarios and not {train_s, eval_s} <= set(scenarios):
                    continue
                if runner.scenario(eval_s):
                    runner.heuristics(Run("d", eval_s, eval_d, "ippo", 0, 0))
                    runner.zero_shot(train_s, train_d, eval_s, eval_d, algos)
    print(f"done: {out}" + (f"; failed: {', '.join(runner.failed)}" if runner.failed else ""), flush=True)
    if runner.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
