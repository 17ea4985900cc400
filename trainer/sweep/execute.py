"""Running a plan's steps: one after another on this machine, or as Ray tasks across a cluster.

Either way a step runs where it is executed: its setup, then its command (the `reled` installed on that
machine), and every command that ran becomes one line of OUT/log.jsonl (command, exit code, wall-clock
seconds, machine, and the Ray node on a cluster), written by this process only. A failed step is
recorded and the plan goes on without the steps that need it. On Ray each step is a task asking for its
CPUs (a training run: its SUMO workers), spread over the nodes; a task whose node is lost is retried on
another and its run resumes from the last checkpoint. The output folder and the working directory must
be the same paths on every node (a shared file system), as Ray's own result folders must.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError
from trainer.marl.workers import MAX_RESTARTS_PER_JOB
from trainer.ray_session import RaySession, check_same_code, code_identity, first_line, node_id
from trainer.sweep.steps import Step

PR_SET_PDEATHSIG = 1  # Linux prctl: a signal for the child when its parent dies
RAY_SWEEP = "a sweep on Ray (--ray-address)"


@dataclass
class Outcome:
    """What running one step did: the commands that ran (log entries) and whether the step succeeded."""

    key: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = True  # every command succeeded, or nothing had to run (False too when a need failed)
    error: str | None = None  # Ray could not run it (its node lost more often than retried)
    refused: str | None = None  # the node cannot run it (other code): stops the sweep


def machine() -> dict[str, object]:
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def run_step(step: Step, cwd: Path, node: str | None = None, with_parent: bool = False) -> Outcome:
    """Run ``step`` on this machine unless its result exists: its setup, then its command."""
    outcome = Outcome(step.key)
    if step.done():
        return outcome
    for key, args in (*step.setup, (step.key, step.arguments())):
        entry = _command(key, args, cwd, node, with_parent)
        outcome.entries.append(entry)
        if entry["rc"] != 0:
            outcome.ok = False
            break
    return outcome


def _command(key: str, args: tuple[str, ...], cwd: Path, node: str | None, with_parent: bool) -> dict[str, Any]:
    cmd = [str(Path(sys.executable).with_name("reled")), *args]  # this machine's installation
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=cwd, preexec_fn=_die_with_parent if with_parent else None).returncode
    entry = {"step": key, "cmd": cmd, "rc": rc, "seconds": round(time.perf_counter() - start, 1),
             "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine()}
    return entry | ({"node": node} if node else {})


def _die_with_parent() -> None:
    """In the child: SIGTERM (a training run's Ctrl-C: latest.pt kept) when the Ray worker that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Log:
    """OUT/log.jsonl, appended as steps finish, and the keys of the steps that failed."""

    def __init__(self, out: Path):
        self.path = out / "log.jsonl"
        self.failed: list[str] = []

    def record(self, outcome: Outcome) -> None:
        if outcome.entries:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as log:
                log.writelines(json.dumps(entry) + "\n" for entry in outcome.entries)
        if not outcome.ok and (outcome.entries or outcome.error):  # not a step left out for a failed need
            self.failed.append(outcome.key)
            why = f"exit {outcome.entries[-1]['rc']}" if outcome.entries else outcome.error
            print(f"! {outcome.key} failed ({why}); going on", flush=True)


def run_here(steps: list[Step], cwd: Path, log: Log) -> None:
    """Every step in order on this machine; a step whose needs failed is left out."""
    ok: dict[str, bool] = {}
    for step in steps:
        if not all(ok.get(key, True) for key in step.needs):
            ok[step.key] = False
            continue
        outcome = run_step(step, cwd)
        log.record(outcome)
        ok[step.key] = outcome.ok


def run_on_ray(steps: list[Step], cwd: Path, log: Log, address: str) -> None:
    """Every step as a Ray task (its needs' results as arguments, so Ray orders them); records as they finish."""
    with RaySession(address, RAY_SWEEP, num_cpus=os.cpu_count()) as session:
        ray = session.ray
        task = ray.remote(_remote_step)
        identity = code_identity()
        refs: dict[str, Any] = {}
        for step in steps:
            needs = [refs[key] for key in step.needs if key in refs]
            refs[step.key] = task.options(num_cpus=step.cpus, scheduling_strategy="SPREAD", name=step.key,
                                          max_retries=MAX_RESTARTS_PER_JOB).remote(step, str(cwd), identity, *needs)
        pending = {ref: key for key, ref in refs.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except ray.exceptions.RayError as exc:  # lost more often than retried (or a need that was)
                outcome = Outcome(key, ok=False, error=first_line(exc))
            if outcome.refused:
                raise RELEDError(outcome.refused)
            log.record(outcome)


def _remote_step(step: Step, cwd: str, driver_identity: str, *needs: Outcome) -> Outcome:
    """A Ray task: ``step`` on the node that took it, once the steps it needs are through."""
    node = node_id()
    try:
        check_same_code(node, code_identity(), driver_identity)  # the node's installation runs the commands
    except RELEDError as exc:
        return Outcome(step.key, ok=False, refused=str(exc))
    if not all(need.ok for need in needs):
        return Outcome(step.key, ok=False)
    return run_step(step, Path(cwd), node, with_parent=True)
