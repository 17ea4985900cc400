"""Look-ahead: play candidate controls from a saved decision in worker processes and return what they did.

Each worker holds one SUMO environment of the scenario (libsumo: one per process). A task starts SUMO
from the main episode's snapshot (``TrafficSignalEnv.restore``: the same vehicles, signals and random
state), drives every light with its control for the horizon and returns the recorded decisions. Starting
a fresh SUMO from the state file is what makes this exact: a state loaded into an already running SUMO
keeps that SUMO's route reader where it was, and on cologne8 the traffic diverged within 300 s (see
docs/sed.md). A task that crashes SUMO or its worker, or runs past its deadline, comes back as ``None``
and is counted; its worker is replaced. Nothing a failed task did is ever executed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from edge_runtime.errors import RELEDError
from trainer.env import EnvConfig, Snapshot, TrafficSignalEnv
from trainer.rollout import Episode, play_episode
from trainer.sed.tools import LightControl, ToolController
from trainer.sim.processes import stop_workers, worker_signals

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LookaheadTask:
    snapshot: Snapshot
    controls: tuple[LightControl, ...]  # per agent, env order
    since: tuple[float, ...]  # per agent: when its control was set (plans count from there)
    decisions: int


@dataclass
class LookaheadResult:
    episode: Episode
    arrivals: list[list[np.ndarray]]  # per decision, per agent: vehicles entering each incoming lane
    seconds: float
    network_halting: np.ndarray  # per decision: halting vehicles on every edge plus vehicles waiting to enter


def lookahead_config(config: EnvConfig) -> EnvConfig:
    """The workers' environment: the main one's scenario and settings, no trip outputs."""
    return replace(config, snapshots=True, with_pressure=True, with_inflow=True, collect_metrics=False, gui=False)


def run_task(env: TrafficSignalEnv, task: LookaheadTask) -> LookaheadResult:
    """One look-ahead in ``env`` (a worker's, or any environment of the same scenario and settings)."""
    start = time.perf_counter()
    controller = ToolController(list(task.controls), list(task.since), record_arrivals=True)
    controller.attach(env)
    halting: list[float] = []
    edges: list[str] = []

    def count(_progress: float) -> None:
        """Halting vehicles anywhere, and those the network could not take in yet: what the lights'
        own lanes do not see (spillback upstream, the queue at the network's entries)."""
        if not env.agents:  # the episode ended and SUMO closed
            halting.append(halting[-1] if halting else 0.0)
            return
        api = env.api
        if not edges:
            edges.extend(e for e in api.edge.getIDList() if not e.startswith(":"))
        halting.append(sum(map(api.edge.getLastStepHaltingNumber, edges)) + len(api.simulation.getPendingVehicles()))

    episode = play_episode(env, controller, task.snapshot.seed, max_decisions=task.decisions,
                           start_from=lambda: env.restore(task.snapshot), on_step=count)
    return LookaheadResult(episode, controller.arrivals, time.perf_counter() - start, np.asarray(halting))


def _worker_main(conn: Connection, config: EnvConfig) -> None:
    """Worker loop: ("task", LookaheadTask) -> ("result", LookaheadResult) | ("failed", reason); ("close",)."""
    worker_signals()
    env = None
    try:
        try:
            env = TrafficSignalEnv(config)
        except RELEDError as exc:
            conn.send(("error", str(exc)))
            return
        conn.send(("ready", None))
        while True:
            message = conn.recv()
            if message[0] != "task":
                break
            try:
                conn.send(("result", run_task(env, message[1])))
            except Exception as exc:  # a candidate that breaks SUMO is dropped, not the run
                log.debug("look-ahead failed", exc_info=True)
                conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    except (EOFError, BrokenPipeError, SystemExit):
        pass
    finally:
        if env is not None:
            env.close()


@dataclass
class _Worker:
    process: Any
    conn: Connection
    task: int | None = None
    deadline: float = float("inf")
    ready: bool = False


@dataclass
class LookaheadStats:
    tasks: int = 0
    failed: int = 0  # SUMO or the worker crashed
    timed_out: int = 0
    snapshot_failed: int = 0  # horizons without look-ahead: the state could not be saved (disk full)
    seconds: float = 0.0  # wall time spent waiting for look-aheads


class LookaheadPool:
    """``workers`` SUMO processes (spawned) that run look-ahead tasks in parallel."""

    def __init__(self, config: EnvConfig, workers: int = 2, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if workers < 1:
            raise RELEDError(f"need at least 1 look-ahead worker, got {workers}")
        self._ctx = mp.get_context("spawn")
        self.config = lookahead_config(config)
        self.timeout = timeout
        self.stats = LookaheadStats()
        self.failures: list[str] = []  # why each failed task failed
        self._startup_failures = 0
        self.workers = [self._spawn() for _ in range(workers)]

    def _spawn(self) -> _Worker:
        conn, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self.config), daemon=True,
                                    name="reled-lookahead")
        process.start()
        child.close()
        return _Worker(process, conn)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def busy_pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.task is not None]

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Block until every worker has its SUMO loaded (a scenario the workers cannot load fails here)."""
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.workers):
            starting = [w for w in self.workers if not w.ready]
            handles = {w.conn: w for w in starting} | {w.process.sentinel: w for w in starting}
            for handle in wait(list(handles), timeout=max(0.0, deadline - time.monotonic())):
                worker = handles[handle]
                if worker in self.workers and not worker.ready:
                    self._receive(worker, handle, {})
            if time.monotonic() > deadline:
                raise RELEDError(f"look-ahead workers did not start within {timeout:g} s")

    def run(self, tasks: list[LookaheadTask]) -> list[LookaheadResult | None]:
        """Every task's result in task order; ``None`` for a task that failed or timed out (counted)."""
        started = time.perf_counter()
        results: dict[int, LookaheadResult | None] = {}
        pending = list(range(len(tasks)))
        while len(results) < len(tasks):
            for worker in self.workers:
                if worker.ready and worker.task is None and pending:
                    try:
                        worker.conn.send(("task", tasks[pending[0]]))
                    except (BrokenPipeError, OSError):  # it died while idle: replace it, the task waits
                        self._replace(worker, results, "its worker process died while idle")
                        continue
                    worker.task = pending.pop(0)
                    worker.deadline = time.monotonic() + self.timeout
            handles = {w.conn: w for w in self.workers} | {w.process.sentinel: w for w in self.workers}
            next_deadline = min((w.deadline for w in self.workers if w.task is not None), default=None)
            wait_s = None if next_deadline is None else max(0.0, next_deadline - time.monotonic())
            for handle in wait(list(handles), timeout=wait_s):
                worker = handles[handle]
                if worker in self.workers:  # else: replaced through its other handle
                    self._receive(worker, handle, results)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.task is not None and now > worker.deadline:
                    self.stats.timed_out += 1
                    self._replace(worker, results, f"no result within {self.timeout:g} s", counted=True)
        self.stats.tasks += len(tasks)
        self.stats.seconds += time.perf_counter() - started
        return [results[k] for k in range(len(tasks))]

    def _receive(self, worker: _Worker, handle: Any, results: dict[int, LookaheadResult | None]) -> None:
        """One message from a worker (or the news that it died)."""
        try:
            if handle is worker.process.sentinel and not worker.conn.poll():
                raise EOFError
            kind, payload = worker.conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            self._replace(worker, results, "its worker process died")
            return
        if kind == "ready":
            worker.ready = True
        elif kind == "error":
            raise RELEDError(f"look-ahead worker could not start the scenario: {payload}")
        elif kind == "failed":
            self._fail(worker, results, payload, replace_worker=False)
        else:
            assert worker.task is not None
            results[worker.task] = payload
            worker.task = None

    def _fail(self, worker: _Worker, results: dict[int, LookaheadResult | None], reason: str,
              replace_worker: bool, counted: bool = False) -> None:
        if worker.task is not None:
            if not counted:
                self.stats.failed += 1
            self.failures.append(reason)
            log.warning("look-ahead candidate dropped: %s", reason)
            results[worker.task] = None
            worker.task = None
        if replace_worker:
            stop_workers([(worker.process, worker.conn)], grace_s=0.5)
            self.workers[self.workers.index(worker)] = self._spawn()

    def _replace(self, worker: _Worker, results: dict[int, LookaheadResult | None], reason: str,
                 counted: bool = False) -> None:
        if worker.task is None and not worker.ready:
            self._startup_failures += 1
            if self._startup_failures > 3:
                raise RELEDError("look-ahead workers keep dying while starting; run `reled eval` on the scenario "
                                 "to see SUMO's error")
        self._fail(worker, results, reason, replace_worker=True, counted=counted)

    def close(self) -> None:
        stop_workers([(w.process, w.conn) for w in self.workers])

    def __enter__(self) -> LookaheadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
