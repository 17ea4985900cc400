"""Parallel rollouts: one SUMO per worker process (libsumo runs one simulation per process).

The learner sees only ``RolloutWorkers``: ``collect(actor_state, jobs)`` returns one Episode per
job, in job order, and ``close()``. A Ray-actor backend can implement the same two calls.
Episodes are seeded by their job, never by the worker that plays them, so results do not depend
on the number of workers. A worker that dies is restarted and its partial episode dropped and
replayed; a worker that reports an error (bad scenario, SUMO refusing the net) stops the run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import torch

from edge_runtime.errors import RELEDError
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.marl.networks import Actor
from trainer.marl.policy import PolicyController
from trainer.rollout import Episode, play_episode
from trainer.sim.processes import stop_workers, worker_signals

log = logging.getLogger(__name__)
MAX_RESTARTS_PER_JOB = 3


@dataclass(frozen=True)
class EpisodeJob:
    seed: int  # SUMO seed and the seed of the action sampler
    deterministic: bool = False  # greedy actions (evaluation)


@dataclass(frozen=True)
class ActorSpec:
    """What a worker needs to build the same actor as the learner."""

    hidden: int
    layers: int
    normalize_obs: bool

    def build(self) -> Actor:
        return Actor(self.hidden, self.layers, self.normalize_obs)


class RolloutWorkers(Protocol):
    def collect(self, actor_state: dict[str, torch.Tensor], jobs: list[EpisodeJob]) -> list[Episode]: ...

    def close(self) -> None: ...


def _worker_main(conn: Connection, env_config: EnvConfig, spec: ActorSpec) -> None:
    """Worker loop: ("weights", state) | ("episode", job) | ("close",). Ctrl-C is the parent's business."""
    worker_signals()
    torch.set_num_threads(1)
    env = None
    try:
        try:
            env = TrafficSignalEnv(env_config)
        except RELEDError as exc:  # the scenario itself is unusable: stop the run
            conn.send(("error", str(exc)))
            return
        actor = spec.build().eval()
        conn.send(("ready", None))
        while True:
            message = conn.recv()
            if message[0] == "weights":
                actor.load_state_dict(message[1])
            elif message[0] == "episode":
                job: EpisodeJob = message[1]
                try:
                    episode = play_episode(env, PolicyController(actor, deterministic=job.deterministic), job.seed)
                except RELEDError as exc:  # SUMO died mid-episode (TraCI's SUMO is a separate process)
                    conn.send(("crashed", str(exc)))
                    return
                conn.send(("episode", episode))
            else:
                break
    except (EOFError, BrokenPipeError, SystemExit):
        pass
    finally:
        if env is not None:
            env.close()


class _Worker:
    def __init__(self, ctx: Any, env_config: EnvConfig, spec: ActorSpec, index: int):
        self.index = index
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, env_config, spec), daemon=True,
                                   name=f"reled-sumo-worker-{index}")
        self.process.start()
        child.close()
        self.job: int | None = None  # index of the job it is playing
        self.weights_version = -1
        self.ready = False


class ProcessWorkers:
    """A pool of SUMO worker processes on this machine (spawned, so torch and libsumo start clean)."""

    def __init__(self, n_workers: int, env_config: EnvConfig, spec: ActorSpec):
        self._ctx = mp.get_context("spawn")
        self._env_config = env_config
        self._spec = spec
        self._version = 0
        self.restarts = 0
        self._startup_failures = 0
        self.workers = [_Worker(self._ctx, env_config, spec, k) for k in range(n_workers)]

    def collect(self, actor_state: dict[str, torch.Tensor], jobs: list[EpisodeJob]) -> list[Episode]:
        self._version += 1
        pending = list(range(len(jobs)))
        results: dict[int, Episode] = {}
        attempts = dict.fromkeys(pending, 0)
        while len(results) < len(jobs):
            for worker in self.workers:
                if worker.job is None and worker.ready and pending:
                    self._dispatch(worker, actor_state, jobs, pending.pop(0))
            owners: dict[Any, _Worker] = {w.conn: w for w in self.workers} | {w.process.sentinel: w
                                                                              for w in self.workers}
            for ready in wait(list(owners)):
                worker = owners[ready]
                if worker is not self.workers[worker.index]:
                    continue  # already replaced through its other handle
                try:
                    if ready is worker.process.sentinel and not worker.conn.poll():
                        raise EOFError
                    kind, payload = worker.conn.recv()
                except (EOFError, ConnectionResetError, OSError):
                    self._replace_dead(worker, pending, attempts)
                    continue
                if kind == "crashed":
                    log.warning("SUMO failed in worker %d: %s", worker.index, payload)
                    self._replace_dead(worker, pending, attempts)
                elif kind == "ready":
                    worker.ready = True
                elif kind == "error":
                    raise RELEDError(f"SUMO worker {worker.index} failed: {payload}")
                else:
                    assert worker.job is not None
                    results[worker.job] = payload
                    worker.job = None
        return [results[k] for k in range(len(jobs))]

    def _dispatch(self, worker: _Worker, actor_state: dict[str, torch.Tensor], jobs: list[EpisodeJob],
                  job: int) -> None:
        if worker.weights_version != self._version:
            worker.conn.send(("weights", actor_state))
            worker.weights_version = self._version
        worker.conn.send(("episode", jobs[job]))
        worker.job = job

    def _replace_dead(self, worker: _Worker, pending: list[int], attempts: dict[int, int]) -> None:
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        if worker.job is not None:
            attempts[worker.job] += 1
            if attempts[worker.job] > MAX_RESTARTS_PER_JOB:
                raise RELEDError(f"SUMO worker died {attempts[worker.job]} times on the same episode "
                                 f"(last exit code {code}); see the log above")
            pending.insert(0, worker.job)
            log.warning("SUMO worker %d stopped (exit code %s) during an episode; restarting it and replaying "
                        "the episode (its partial rollout is dropped)", worker.index, code)
        elif not worker.ready:
            self._startup_failures += 1
            if self._startup_failures > MAX_RESTARTS_PER_JOB:
                raise RELEDError(f"SUMO workers keep dying while starting (last exit code {code}); "
                                 "run `reled eval` on the scenario to see SUMO's error")
        else:
            log.warning("SUMO worker %d died (exit code %s); restarting it", worker.index, code)
        self.restarts += 1
        worker.conn.close()
        self.workers[worker.index] = _Worker(self._ctx, self._env_config, self._spec, worker.index)

    def close(self) -> None:
        """Ask every worker to stop, then terminate and finally kill what is left: no orphan SUMO."""
        stop_workers([(w.process, w.conn) for w in self.workers])

    def __enter__(self) -> ProcessWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
