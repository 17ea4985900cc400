"""A plan as steps: each one `reled` command, skipped once its result exists, a stopped training resumed.

A step names the steps it needs (a RELED run needs its demonstrations, a zero-shot evaluation its
training run) and the CPUs it takes (a training run: its SUMO workers). Whether a step is done, and
whether a training run starts or resumes, is decided when the step runs, on the machine that runs it,
so a step retried after its node was lost continues from the last checkpoint. Scenario imports are a
step's setup, run first on the same machine (`--if-missing`): imported scenarios live in each
machine's $RELED_HOME.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.sweep.runs import Run

HEURISTICS = "fixed,greedy,max-pressure"


@dataclass(frozen=True)
class Step:
    """One `reled` command (its arguments after `reled`) and the file that says it is done."""

    key: str
    args: tuple[str, ...]
    result: Path  # done when it exists (and, if it is JSON with a "finished" field, that says true)
    needs: tuple[str, ...] = ()  # keys of steps that must have succeeded first (those in the same plan)
    setup: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (key, arguments): idempotent, first, same machine
    cpus: int = 1
    resume: tuple[str, ...] = ()  # the arguments instead when ``resume_from`` exists (a stopped run)
    resume_from: Path | None = None

    def done(self) -> bool:
        if not self.result.is_file():
            return False
        if self.result.suffix != ".json":
            return True
        data = json.loads(self.result.read_text())
        return not isinstance(data, dict) or bool(data.get("finished", True))

    def arguments(self) -> tuple[str, ...]:
        """What runs now: the resume arguments for a run that stopped, else the step's own."""
        return self.resume if self.resume_from is not None and self.resume_from.is_file() else self.args


class Planner:
    """Turns runs into steps (in order, a step after those it needs), each once however many runs share it."""

    def __init__(self, out: Path, *, workers: int, eval_every: int, eval_episodes: int, sed_every: int,
                 heuristics_episodes: int, root: Path, imports: dict[str, list[str]] | None = None,
                 config: Path | None = None):
        self.out = out
        self.workers, self.eval_every, self.eval_episodes = workers, eval_every, eval_episodes
        self.sed_every, self.heuristics_episodes = sed_every, heuristics_episodes
        self.root = root  # relative timing files are read from here
        self.imports = imports or {}  # scenario -> `reled scenario import` arguments
        self.config = config  # [env]/[timing] for runs without a timing of their own (a sweep file's)
        self.steps: dict[str, Step] = {}

    def _add(self, step: Step) -> str:
        self.steps.setdefault(step.key, step)
        return step.key

    def _setup(self, scenario: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if scenario not in self.imports:
            return ()
        return ((f"import-{scenario}", ("scenario", "import", *self.imports[scenario], "--name", scenario,
                                         "--if-missing")),)

    def _config_args(self, run: Run) -> tuple[str, ...]:
        if run.timing:
            return ("--config", str(self.root / run.timing))
        return ("--config", str(self.config)) if self.config else ()

    def add_run(self, run: Run) -> None:
        """A training run with its reference lines and, for RELED, its demonstrations."""
        self.add_heuristics(run)
        folder = self.out / "runs" / run.key
        needs: tuple[str, ...] = ()
        args = ("train", "--algo", run.algo, "--scenario", run.scenario, "--demand", run.demand, "--seed",
                str(run.seed), "--steps", str(run.steps), "--workers", str(self.workers), "--runs-dir",
                str(folder.parent), "--name", run.key, "--eval-every", str(self.eval_every), "--eval-episodes",
                str(self.eval_episodes), *self._config_args(run))
        if run.algo == "reled":
            needs = (self._add_demos(run),)
            own_passes = "--sed-every" in run.flags  # a variant's own schedule replaces the profile's
            args += ("--demos", str(self.out / "demos" / run.demos_key),
                     *(() if own_passes else ("--sed-every", str(self.sed_every))), *run.flags)
        self._add(Step(run.key, args, folder / "summary.json", needs, self._setup(run.scenario), self.workers,
                       ("train", "--resume", str(folder), "--workers", str(self.workers)), folder / "latest.pt"))

    def add_heuristics(self, run: Run) -> None:
        """The reference lines (fixed, greedy, max-pressure) on the run's scenario, demand and timing."""
        if self.heuristics_episodes < 1:
            return
        target = self.out / "heuristics" / f"{run.scenario}{'-resco' if run.timing else ''}-{run.demand}.json"
        self._add(Step(f"heuristics-{target.stem}", (
            "eval", "--scenario", run.scenario, "--demand", run.demand, "--controller", HEURISTICS, "--seeds",
            str(self.heuristics_episodes), "--json", str(target), *self._config_args(run)), target,
            setup=self._setup(run.scenario)))

    def _add_demos(self, run: Run) -> str:
        """The verified demonstrations a RELED run starts from (one store per scenario, demand, seed)."""
        folder = self.out / "demos" / run.demos_key
        args = ("demos", "generate", "--scenario", run.scenario, "--demand", run.demand, "--seed", str(run.seed),
                "--out", str(folder), "--force", *self._config_args(run))
        if run.tools_only:
            args += ("--no-llm",)
        if run.unbounded:
            args += ("--lambda", "0")
        return self._add(Step(f"demos-{run.demos_key}", args, folder / "manifest.json",
                              setup=self._setup(run.scenario)))

    def add_zero_shot(self, train_run: Run, scenario: str, demand: str) -> None:
        """``train_run``'s final policy on another scenario or demand, after it has trained."""
        policy = self.out / "runs" / train_run.key / "latest.pt"
        if train_run.key not in self.steps and not policy.is_file():
            return  # neither trained here nor before
        target = self.out / "zero_shot" / f"{train_run.key}--{scenario}-{demand}.json"
        needs = (train_run.key,) if train_run.key in self.steps else ()
        self._add(Step(f"zero-shot-{target.stem}", (  # the heuristics on the same seeds are in heuristics/
            "eval", "--scenario", scenario, "--demand", demand, "--policy", str(policy), "--zero-shot", "--seeds",
            str(self.heuristics_episodes), "--json", str(target)), target, needs, self._setup(scenario)))
