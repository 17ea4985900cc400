"""`reled train`: collect episodes in parallel, update the PPO learner, evaluate, checkpoint, log.

One update = ``episodes_per_update`` sampled episodes → GAE → epochs of minibatch steps. Every
``eval_every`` updates the policy plays ``eval_episodes`` greedy episodes; the best evaluation
keeps ``best.pt``. The last update ends with ``LAST_N`` greedy episodes of the final policy, whose
mean delay is the run's headline figure (what a deployed policy would show, not its best episode).
Extra updates (``extra_updates``: street rollouts, ``trainer.marl.street_update``) run the same update with
more rows added to its batch.

``overlap``: while the learner updates on batch k, the workers already play batch k+1 with the weights the
learner started update k from, so the cores the learner leaves idle keep collecting. Each batch is then one
update behind the learner; PPO's ratio takes the log-probs of the weights that played (kept as the behaviour
policy, saved in the checkpoint), and which weights play which batch is fixed by the schedule, never by
timing, so a seed gives the same run with any number of workers and after --resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import RELEDError
from trainer.env import TrafficSignalEnv
from trainer.marl.checkpoint import check_scenario, load_checkpoint, save_checkpoint
from trainer.marl.config import TrainConfig
from trainer.marl.expert_demos import (
    RunFacts,
    demos_folder,
    initial_demos,
    open_demos,
    remove_other_versions,
    sed_pass,
)
from trainer.marl.hpo import Demonstrations, HybridObjective, weight_summary
from trainer.marl.networks import Actor
from trainer.marl.ppo import PPOLearner
from trainer.marl.run_folder import (
    BEST,
    EVAL_COLUMNS,
    EVALUATIONS_FILE,
    HPO_COLUMNS,
    HPO_FILE,
    LAST_N,
    LATEST,
    METRICS_FILE,
    SED_COLUMNS,
    SED_FILE,
    CsvLog,
    RunProgress,
    read_config,
    write_config,
    write_summary,
)
from trainer.marl.storage import RolloutBatch
from trainer.marl.workers import ActorSpec, EpisodeJob, ProcessWorkers, RolloutWorkers
from trainer.ray_session import check_address, missing_ray, ray_installed
from trainer.rollout import Episode
from trainer.scenarios import get_scenario

log = logging.getLogger(__name__)
UpdateHook = Callable[[dict[str, Any]], None]
# rows added to an update's batch (street rollouts): (learner, batch) -> (the larger batch, metrics.csv columns)
BatchExtension = Callable[[PPOLearner, RolloutBatch], tuple[RolloutBatch, dict[str, Any]]]
SEED_STRIDE = 100_000  # training episode k of seed s plays SUMO seed s * SEED_STRIDE + k
PERIODIC_EVAL_SEED = 1_000  # periodic evaluation episode k plays SUMO seed 1000 + k
# metrics.csv, empty without a pass
SED_STATS = ("sed_seconds", "sed/D_mean", "sed/B_mean", "sed/replaced", "sed/llm_calls", "sed/llm_late")


class TrainingRun:
    """A run folder being trained; build with ``create`` or ``resume``."""

    def __init__(self, folder: Path, config: TrainConfig, progress: RunProgress, learner_state: dict | None):
        if config.backend_workers == "ray":  # refused before a run folder is written
            if not ray_installed():
                raise missing_ray("--backend-workers ray")
            check_address(config.ray_address)
        self.folder = folder
        self.config = config
        self.progress = progress
        scenario = get_scenario(config.scenario)
        scenario.demand(config.demand)
        scenario.check_files()
        probe = TrafficSignalEnv(config.env, resolved=scenario)
        self.agents = list(probe.possible_agents)
        self.n_phases = [i.n_phases for i in probe.intersections]
        self.facts = RunFacts(scenario.name, self.agents, config.demand, config.env.reward, asdict(probe.timing),
                              probe.end_time - scenario.begin, self.n_phases)
        probe.close()
        # the networks' initialization (orthogonal: a QR decomposition) depends on the thread count in its last bits
        torch.set_num_threads(_learner_threads(config))
        self.learner = PPOLearner(config, len(self.agents))
        if learner_state is not None:
            self.learner.load_state_dict(learner_state)
        self.metrics = CsvLog(folder / METRICS_FILE)
        self.evaluations = CsvLog(folder / EVALUATIONS_FILE, EVAL_COLUMNS)
        self.hpo_log = CsvLog(folder / HPO_FILE, HPO_COLUMNS)
        self.sed_log = CsvLog(folder / SED_FILE, SED_COLUMNS)
        self.objective: HybridObjective | None = None  # RELED's imitation term, once its demonstrations are there
        # overlap: the weights that play the next batch, and that batch once it was collected during an update
        self.behaviour_state: dict[str, torch.Tensor] | None = None
        self._next_batch: tuple[list[EpisodeJob], list[Episode]] | None = None

    def _attach_demos(self, state: dict[str, Any] | None = None) -> None:
        """Load the demonstrations the checkpoint names (RELED runs only)."""
        demos = open_demos(demos_folder(self.folder, self.progress.demos_version), self.facts)
        self.objective = HybridObjective(self.config.hpo, Demonstrations(demos, len(self.agents)))
        if state is not None:
            self.objective.load_state_dict(state)

    @classmethod
    def create(cls, folder: Path, config: TrainConfig) -> TrainingRun:
        if folder.exists() and any(folder.iterdir()):
            raise RELEDError(f"run folder {folder} already exists: use --resume {folder} to continue it, "
                             "or --name to start another")
        run = cls(folder, config, RunProgress(), None)  # checks the scenario before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        if config.algo == "reled":
            try:
                seconds = initial_demos(folder, config, run.facts)
            except BaseException:  # a refused --demos store or a failed SED run: nothing is left behind
                shutil.rmtree(folder, ignore_errors=True)
                raise
            # the demonstrations' cost is part of RELED's wall-clock (experiment b)
            run.progress.sed_seconds = run.progress.wall_seconds = seconds
            run._attach_demos()
        write_config(folder, config)
        return run

    @classmethod
    def resume(cls, folder: Path, steps: int | None = None, workers: int | None = None,
               **backend: str | None) -> TrainingRun:
        """Continue from latest.pt; ``steps`` may extend the budget, ``workers`` and ``backend``
        (backend_workers, ray_address) change the parallelism (results depend on neither)."""
        config = read_config(folder)
        data = load_checkpoint(folder / LATEST)
        changes = {"steps": steps, "workers": workers, **backend}
        config = replace(config, **{k: v for k, v in changes.items() if v is not None})
        progress = RunProgress(**data["progress"])
        if steps is not None and steps > progress.agent_steps:
            progress.finished = False
        run = cls(folder, config, progress, data["learner"])
        run.behaviour_state = data.get("behaviour_actor")
        check_scenario(data, folder / LATEST, config.scenario, run.agents, run.n_phases)
        if config.algo == "reled":
            remove_other_versions(folder, progress.demos_version)
            run._attach_demos(data["hpo"])
        for csv_log in (run.metrics, run.evaluations, run.hpo_log, run.sed_log):
            csv_log.truncate_after(progress.updates)
        write_config(folder, config)
        return run

    # -- the loop ------------------------------------------------------------------------------
    def train(self, on_update: UpdateHook | None = None, workers: RolloutWorkers | None = None) -> RunProgress:
        with self._updating(on_update, workers) as update:
            while not self.progress.finished:
                update(None)
        return self.progress

    def extra_updates(self, n: int, extend: BatchExtension, on_update: UpdateHook | None = None,
                      workers: RolloutWorkers | None = None) -> list[dict[str, Any]]:
        """``n`` updates beyond the schedule, each batch grown by ``extend``. Each evaluates its policy and makes
        it best.pt (what the run deploys next); they never finish a run nor run a SED pass."""
        with self._updating(on_update, workers) as update:
            return [update(extend) for _ in range(n)]

    @contextlib.contextmanager
    def _updating(self, on_update: UpdateHook | None, workers: RolloutWorkers | None,
                  ) -> Iterator[Callable[[BatchExtension | None], dict[str, Any]]]:
        """Workers and TensorBoard open for a series of updates; yields the function doing one update."""
        torch.set_num_threads(_learner_threads(self.config))
        spec = ActorSpec(self.config.ppo.hidden, self.config.ppo.layers, self.config.ppo.normalize_obs)
        pool = workers or _rollout_workers(self.config, spec)
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

        writer = SummaryWriter(str(self.folder / "tb"), purge_step=self.progress.agent_steps or None)

        def update(extend: BatchExtension | None) -> dict[str, Any]:
            row = self._update(pool, extend)
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    writer.add_scalar(key, value, self.progress.agent_steps)
            if on_update:
                on_update(row)
            return row

        try:
            yield update
        finally:
            writer.close()
            if workers is None:
                pool.close()

    def _jobs(self, first_episode: int) -> list[EpisodeJob]:
        cfg = self.config
        return [EpisodeJob(cfg.seed * SEED_STRIDE + first_episode + k) for k in range(cfg.episodes_per_update)]

    def _behaviour(self, state: dict[str, torch.Tensor]) -> Actor:
        actor = Actor(self.config.ppo.hidden, self.config.ppo.layers, self.config.ppo.normalize_obs)
        actor.load_state_dict(state)
        return actor.eval()

    def _batch(self, pool: RolloutWorkers, jobs: list[EpisodeJob], overlap: bool,
               ) -> tuple[list[Episode], Actor | None]:
        """This update's episodes and the policy that played them (None: the learner's current one).

        With ``overlap`` they were played by ``behaviour_state``: collected during the previous update, or now
        (the first update, after --resume)."""
        if not overlap or self.behaviour_state is None:
            return pool.collect(self.learner.actor.state_dict(), jobs), None
        if self._next_batch is not None and self._next_batch[0] == jobs:
            episodes = self._next_batch[1]
        else:
            episodes = pool.collect(self.behaviour_state, jobs)
        self._next_batch = None
        return episodes, self._behaviour(self.behaviour_state)

    def _update(self, pool: RolloutWorkers, extend: BatchExtension | None = None) -> dict[str, Any]:
        cfg, progress = self.config, self.progress
        extra = extend is not None  # an update beyond the schedule (extra_updates)
        overlap = cfg.overlap and not extra
        start = time.perf_counter()
        episodes, behaviour = self._batch(pool, self._jobs(progress.episodes), overlap)
        collected = time.perf_counter()
        lr = cfg.ppo.lr * (1 - (1 - cfg.ppo.lr_final_fraction) * min(1.0, progress.agent_steps / cfg.steps))
        results: dict[str, Any] = {}

        def learn() -> None:
            batch = self.learner.prepare(episodes, behaviour)
            if self.objective is not None:
                hpo_start = time.perf_counter()
                results["weights"] = weights = self.objective.weigh(
                    episodes, behaviour or self.learner.actor,  # the normalizer the episodes saw
                    progress.greedy_agent_return)
                batch = RolloutBatch.concat([batch, self.objective.expert_rows(weights, batch.critic_in.shape[1])])
                results["hpo"] = {**weight_summary(weights, self.objective.sigma),
                                  "hpo_seconds": time.perf_counter() - hpo_start, **dict.fromkeys(SED_STATS)}
            if extend is not None:
                batch, results["extra"] = extend(self.learner, batch)
            results["stats"] = self.learner.update(batch, lr)
            self.learner.observe(episodes)

        overlapped = 0.0
        if overlap:  # the next batch is played by the weights this update starts from
            self.behaviour_state = {k: v.detach().clone() for k, v in self.learner.actor.state_dict().items()}
        if overlap and progress.agent_steps + sum(ep.agent_steps for ep in episodes) < cfg.steps:
            overlapped = self._learn_while_collecting(learn, pool, progress.episodes + len(episodes))
        else:
            learn()
        learned = time.perf_counter()
        stats, hpo_stats, extra_stats = results["stats"], results.get("hpo", {}), results.get("extra", {})
        weights = results.get("weights", [])
        progress.updates += 1
        progress.episodes += len(episodes)
        progress.agent_steps += sum(ep.agent_steps for ep in episodes)
        final = not extra and progress.agent_steps >= cfg.steps
        if self.objective is not None:
            for w in weights:
                self.hpo_log.append({"update": progress.updates, "agent_steps": progress.agent_steps,
                                     "agent": self.agents[w.agent], "weight": w.weight, "distance": w.distance,
                                     "expert_return": w.expert_return, "agent_return": w.agent_return,
                                     "gap": w.gap})
            if cfg.hpo.refines and progress.updates % cfg.hpo.sed_every == 0 and not final and not extra:
                hpo_stats |= self._sed_pass()
        eval_delay = None
        if final or extra or progress.updates % cfg.eval_every == 0:
            eval_delay = self._evaluate(pool, LAST_N if final else cfg.eval_episodes, final,
                                        progress.wall_seconds + time.perf_counter() - start)
        progress.wall_seconds += time.perf_counter() - start
        if not extra:
            progress.finished = final
        row = {
            "update": progress.updates, "agent_steps": progress.agent_steps, "episodes": progress.episodes,
            "wall_seconds": progress.wall_seconds,
            "train_delay": _mean(ep.metrics["avg_delay"] for ep in episodes),
            "train_travel_time": _mean(ep.metrics["avg_travel_time"] for ep in episodes),
            "train_reward": _mean(ep.mean_agent_return for ep in episodes),
            "eval_delay": eval_delay,
            **stats,
            "collect_seconds": collected - start, "learn_seconds": learned - collected,
            "overlapped_collect_seconds": overlapped,
            "sim_seconds": sum(ep.sim_seconds for ep in episodes),
            "policy_seconds": sum(ep.policy_seconds for ep in episodes),
            **hpo_stats,
            **extra_stats,
        }
        self.metrics.widen([*extra_stats, *hpo_stats])  # a run resumed from before a column existed
        self.metrics.append(row)
        self._checkpoint(eval_delay, replace_best=extra)
        return row

    def _learn_while_collecting(self, learn: Callable[[], None], pool: RolloutWorkers, first_episode: int) -> float:
        """Run ``learn`` in a thread while this thread collects the next batch with the weights the update
        starts from; returns the collection's seconds. Ctrl-C lands here, in the collection, as without
        overlap; the learner thread is joined before anything leaves."""
        assert self.behaviour_state is not None
        failure: list[BaseException] = []

        def run() -> None:
            try:
                learn()
            except BaseException as exc:  # re-raised in the training thread
                failure.append(exc)

        learner = threading.Thread(target=run, name="reled-learner", daemon=True)
        learner.start()
        try:
            started = time.perf_counter()
            jobs = self._jobs(first_episode)
            self._next_batch = (jobs, pool.collect(self.behaviour_state, jobs))
            return time.perf_counter() - started
        finally:
            learner.join()
            if failure:
                raise failure[0]

    def _sed_pass(self) -> dict[str, Any]:
        """A SED pass between updates (the rollout workers are idle, so SUMO and llama.cpp do not share cores)."""
        start = time.perf_counter()
        assert self.objective is not None
        result = sed_pass(self.folder, self.progress.demos_version, self.config, self.facts,
                          self.learner.actor, self.progress.updates)
        for row in result.rows:
            self.sed_log.append(row)
        if result.version != self.progress.demos_version:
            self.progress.demos_version = result.version
            self._attach_demos(self.objective.state_dict())
        self.progress.sed_passes += 1
        seconds = time.perf_counter() - start
        self.progress.sed_seconds += seconds
        kept = [r for r in result.rows if r["adopted"]]
        return dict(zip(SED_STATS, (seconds, _mean(r["divergence"] for r in kept), _mean(r["bound"] for r in kept),
                                    len(result.replaced), result.llm_calls, result.llm_late), strict=True))

    def _evaluate(self, pool: RolloutWorkers, n: int, final: bool, wall: float) -> float:
        progress = self.progress
        # final evaluations always play SUMO seeds 0..n-1 (those `reled eval` uses for the heuristics);
        # periodic ones walk through their own seeds, untouched by a final evaluation before a resume
        first = 0 if final else PERIODIC_EVAL_SEED + progress.eval_episodes
        jobs = [EpisodeJob(first + k, deterministic=True) for k in range(n)]
        episodes = pool.collect(self.learner.actor.state_dict(), jobs)
        if not final:
            progress.eval_episodes += n
            # per agent, mean reward per decision of the greedy policy: HPO's G_A,k until the next evaluation
            progress.greedy_agent_return = np.mean([ep.rewards.mean(axis=0) for ep in episodes], axis=0).tolist()
        for ep in episodes:
            progress.history.append(ep.metrics["avg_delay"])
            self.evaluations.append({"update": progress.updates, "agent_steps": progress.agent_steps,
                                     "wall_seconds": wall, "final": int(final), "seed": ep.seed,
                                     **{k: ep.metrics[k] for k in EVAL_COLUMNS[5:]}})
        return _mean(ep.metrics["avg_delay"] for ep in episodes)

    def _checkpoint(self, eval_delay: float | None, replace_best: bool = False) -> None:
        progress = self.progress
        improved = eval_delay is not None and (replace_best or eval_delay < progress.best_delay)
        if improved:
            progress.best_delay, progress.best_update = float(eval_delay), progress.updates
        payload = {"algo": self.config.algo, "scenario": self.config.scenario, "demand": self.config.demand,
                   "agents": self.agents, "n_phases": self.n_phases, "config": self.config.as_dict(),
                   "learner": self.learner.state_dict(), "progress": asdict(progress)}
        if self.objective is not None:
            payload["hpo"] = self.objective.state_dict()
        if self.config.overlap and self.behaviour_state is not None:
            payload["behaviour_actor"] = self.behaviour_state  # what plays the next batch (exact --resume)
        save_checkpoint(self.folder / LATEST, payload)
        if self.objective is not None:  # the checkpoint names the demonstrations in force: drop older ones
            remove_other_versions(self.folder, progress.demos_version)
        if improved:
            save_checkpoint(self.folder / BEST, payload)
        write_summary(self.folder, self.config, progress)


def _learner_threads(config: TrainConfig) -> int:
    """torch threads of the learner: with overlap it shares the cores with the workers, where more would spin."""
    return 1 if config.overlap else config.threads


def _rollout_workers(cfg: TrainConfig, spec: ActorSpec) -> RolloutWorkers:
    """The configured backend: worker processes here, or Ray actors (Ray is imported only when asked for)."""
    if cfg.backend_workers == "ray":
        from trainer.marl.ray_workers import RayWorkers

        return RayWorkers(cfg.workers, cfg.env, spec, cfg.ray_address)
    return ProcessWorkers(cfg.workers, cfg.env, spec)


def _mean(values: Any) -> float:
    return float(np.mean(list(values)))

