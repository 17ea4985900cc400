"""Rollout workers as Ray actors: one SUMO per actor, on this machine or across a Ray cluster.

The same ``RolloutWorkers`` seam as ``ProcessWorkers`` and the same rules: episodes are seeded by their
job, so results do not depend on how many actors play them nor on which node; an actor that dies (its
process killed, its node lost) is replaced and its episode replayed from the start, at most
``MAX_RESTARTS_PER_JOB`` times per episode; an actor that cannot build the env (a scenario missing on
its node, SUMO refusing the net) stops the run with that error. Replacements are ours rather than
Ray's ``max_restarts``: a replayed episode is counted and logged like a local one, and a replacement
that cannot be placed (the cluster lost the CPUs) is an error after ``START_TIMEOUT_S``, not a hang.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from edge_runtime.errors import RELEDError
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.marl.policy import PolicyController
from trainer.marl.workers import MAX_RESTARTS_PER_JOB, ActorSpec, EpisodeJob
from trainer.ray_session import RaySession, check_same_code, code_identity, first_line, node_id
from trainer.rollout import Episode, play_episode

log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # an actor not placed and started by then: the cluster lacks the CPUs
CLOSE_GRACE_S = 10.0  # actors close their SUMO within this, then are killed


class RolloutActor:
    """A SUMO and an actor network in one Ray worker process (Ray wraps it with ``ray.remote``)."""

    def __init__(self, env_config: EnvConfig, spec: ActorSpec):
        torch.set_num_threads(1)
        self.env: TrafficSignalEnv | None = None
        self.error: str | None = None
        try:
            self.env = TrafficSignalEnv(env_config)
        except RELEDError as exc:  # the scenario itself is unusable here: the driver stops the run
            self.error = str(exc)
        self.actor = spec.build().eval()
        self.version = -1

    def hello(self) -> tuple[str, int, str, str | None]:
        """(node id, pid, code identity, why the env could not start): where it runs, what code, whether it can."""
        return node_id(), os.getpid(), code_identity(), self.error

    def play(self, version: int, actor_state: dict[str, torch.Tensor], job: EpisodeJob) -> tuple[str, Any]:
        """("episode", Episode) | ("crashed", why): SUMO died mid-episode."""
        assert self.env is not None, "hello() reported why this actor has no env"
        if version != self.version:
            self.actor.load_state_dict(actor_state)
            self.version = version
        try:
            return "episode", play_episode(self.env, PolicyController(self.actor, deterministic=job.deterministic),
                                           job.seed)
        except RELEDError as exc:  # SUMO died mid-episode (TraCI's SUMO is a separate process)
            return "crashed", str(exc)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


@dataclass
class _Slot:
    """One actor position: the live handle, whether it has started, and the job it plays."""

    handle: Any
    started: Any  # ObjectRef of hello() until it has answered, then None
    node: str = ""
    pid: int = 0
    job: int | None = None


class RayWorkers:
    """``n_workers`` Ray actors of one CPU each, spread over the cluster's nodes."""

    def __init__(self, n_workers: int, env_config: EnvConfig, spec: ActorSpec, address: str = "local"):
        self.session = RaySession(address, "--backend-workers ray", num_cpus=n_workers)
        self.ray = self.session.ray
        self._remote = self.ray.remote(num_cpus=1, max_restarts=0, max_concurrency=1)(RolloutActor)
        self._args = (env_config, spec)
        self._identity = code_identity()
        self._version = 0
        self.restarts = 0
        self._startup_failures = 0
        self.episode_nodes: list[tuple[int, str]] = []  # (SUMO seed, node id) of every episode, in finishing order
        try:
            self.slots = [self._new_slot() for _ in range(n_workers)]
            self._wait_started(self.slots)
        except BaseException:
            self.close()
            raise

    def _new_slot(self) -> _Slot:
        handle = self._remote.options(scheduling_strategy="SPREAD").remote(*self._args)
        return _Slot(handle, handle.hello.remote())

    def _wait_started(self, slots: list[_Slot]) -> None:
        """Block until ``slots`` answered hello (all actors placed, same code everywhere)."""
        while waiting := {slot.started: slot for slot in slots if slot.started is not None}:
            done, _ = self.ray.wait(list(waiting), num_returns=1, timeout=START_TIMEOUT_S)
            if not done:
                raise self._not_placed(len(waiting))
            self._started(waiting[done[0]])  # a replaced slot waits again with its new actor

    def _not_placed(self, n: int) -> RELEDError:
        free = self.ray.available_resources().get("CPU", 0)
        return RELEDError(f"{n} Ray actor(s) of 1 CPU could not start within {START_TIMEOUT_S:.0f} s at "
                          f"--ray-address {self.session.address} ({free:g} CPU free): use fewer --workers or add "
                          "nodes")

    def _started(self, slot: _Slot) -> None:
        """Take ``slot``'s hello answer; an actor that died starting is replaced (bounded)."""
        try:
            slot.node, slot.pid, identity, error = self.ray.get(slot.started)
        except self.ray.exceptions.RayActorError as exc:
            self._startup_failures += 1
            if self._startup_failures > MAX_RESTARTS_PER_JOB:
                raise RELEDError(f"Ray actors keep dying while starting ({first_line(exc)}); run `reled eval` on "
                                 "the scenario on that node to see the error") from None
            self._replace(slot)
            return
        slot.started = None
        check_same_code(slot.node, identity, self._identity)
        if error is not None:
            raise RELEDError(f"SUMO worker on Ray node {slot.node} failed: {error}")
        log.info("rollout actor started on node %s (pid %d)", slot.node, slot.pid)

    def collect(self, actor_state: dict[str, torch.Tensor], jobs: list[EpisodeJob]) -> list[Episode]:
        self._version += 1
        state = self.ray.put(actor_state)
        pending = list(range(len(jobs)))
        attempts = dict.fromkeys(pending, 0)
        results: dict[int, Episode] = {}
        running: dict[Any, _Slot] = {}
        while len(results) < len(jobs):
            for slot in self.slots:
                if slot.started is None and slot.job is None and pending:
                    slot.job = pending.pop(0)
                    running[slot.handle.play.remote(self._version, state, jobs[slot.job])] = slot
            starting = {slot.started: slot for slot in self.slots if slot.started is not None}
            done, _ = self.ray.wait([*running, *starting], num_returns=1,
                                    timeout=None if running else START_TIMEOUT_S)
            if not done:
                raise self._not_placed(len(starting))
            if done[0] in starting:
                self._started(starting[done[0]])
                continue
            slot = running.pop(done[0])
            try:
                kind, payload = self.ray.get(done[0])
            except self.ray.exceptions.RayActorError as exc:
                self._lost(slot, pending, attempts, f"Ray lost it: {first_line(exc)}")
                continue
            if kind == "crashed":
                log.warning("SUMO failed in Ray actor on node %s: %s", slot.node, payload)
                self._lost(slot, pending, attempts, "SUMO failed")
            else:
                assert slot.job is not None
                # Ray hands numpy arrays over as read-only views of its object store: the learner gets its own
                # writable copies (as from a pipe) and the store its memory back
                results[slot.job] = copy.deepcopy(payload)
                self.episode_nodes.append((payload.seed, slot.node))
                slot.job = None
        return [results[k] for k in range(len(jobs))]

    def _lost(self, slot: _Slot, pending: list[int], attempts: dict[int, int], why: str) -> None:
        """``slot``'s actor is gone mid-episode: replace it and put the episode back first in line."""
        assert slot.job is not None
        attempts[slot.job] += 1
        if attempts[slot.job] > MAX_RESTARTS_PER_JOB:
            raise RELEDError(f"Ray actors died {attempts[slot.job]} times on the same episode (last on node "
                             f"{slot.node}: {why}); see the log above")
        log.warning("Ray actor on node %s stopped (%s) during an episode; restarting it and replaying the episode "
                    "(its partial rollout is dropped)", slot.node, why)
        pending.insert(0, slot.job)
        self._replace(slot)

    def _replace(self, slot: _Slot) -> None:
        self.ray.kill(slot.handle, no_restart=True)
        fresh = self._new_slot()
        slot.handle, slot.started, slot.node, slot.pid, slot.job = fresh.handle, fresh.started, "", 0, None
        self.restarts += 1

    def close(self) -> None:
        """Every actor closes its SUMO (or is killed after ``CLOSE_GRACE_S``); a private Ray is stopped."""
        if not self.ray.is_initialized():
            return
        slots = getattr(self, "slots", [])
        if closing := [slot.handle.close.remote() for slot in slots]:
            self.ray.wait(closing, num_returns=len(closing), timeout=CLOSE_GRACE_S)
        for slot in slots:
            self.ray.kill(slot.handle, no_restart=True)
        self.session.close()

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
