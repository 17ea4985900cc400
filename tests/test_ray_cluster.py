"""A real two-node Ray cluster on this machine: training and a sweep spread over both, a node lost mid-run."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ray_cluster import LocalRayCluster, RayNode

from trainer.marl.checkpoint import load_checkpoint
from trainer.marl.config import load_train_config
from trainer.marl.ray_workers import RayWorkers
from trainer.marl.run_folder import CsvLog
from trainer.marl.training import TrainingRun
from trainer.marl.workers import ActorSpec

TIMING = {"wall_seconds", "collect_seconds", "learn_seconds", "sim_seconds", "policy_seconds"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    """A head of 2 CPUs; each test adds the nodes it needs. Stopped (and checked gone) at the module's end."""
    ray_cluster = LocalRayCluster()
    try:
        ray_cluster.start_head(num_cpus=2)
        yield ray_cluster
    finally:
        ray_cluster.close()


@pytest.fixture
def node2(cluster: LocalRayCluster) -> Iterator[RayNode]:
    """A second node of 1 CPU (and a resource of its own), lost at the test's end if the test did not lose it."""
    node = cluster.add_node(f"node{len(cluster.nodes) + 1}", num_cpus=1, resources={"node2": 1})
    yield node
    cluster.kill(node)


def _config(**train):
    # 2 updates of 2 half-hour episodes (2 × 720 agent-steps), an evaluation after each
    return load_train_config(None, train={"scenario": "grid2x2", "workers": 2, "steps": 2880, "eval_every": 1,
                                          "eval_episodes": 1, "seed": 7, **train}, env={"episode_seconds": 1800.0})


def _rows(folder: Path, name: str) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in CsvLog(folder / name).read()]


@pytest.mark.slow
def test_training_spreads_over_two_nodes_and_survives_losing_one(cluster, node2, tmp_path):
    head = cluster.nodes[0]
    local = tmp_path / "local"
    TrainingRun.create(local, _config()).train()  # the reference: worker processes here, uninterrupted
    run = TrainingRun.create(tmp_path / "ray", _config(backend_workers="ray", ray_address=cluster.address))
    first_update, finished = threading.Event(), threading.Event()
    killed: list[RayNode] = []

    def lose_node2(pool: RayWorkers) -> None:
        """As soon as the second update plays an episode on node2, lose node2 (the episode is in flight)."""
        first_update.wait()
        slot = next(s for s in pool.slots if s.node == node2.node_id)
        while slot.job is None and not finished.is_set():
            finished.wait(0.002)
        if not finished.is_set():
            cluster.kill(node2)
            killed.append(node2)

    spec = ActorSpec(run.config.ppo.hidden, run.config.ppo.layers, run.config.ppo.normalize_obs)
    with RayWorkers(2, run.config.env, spec, cluster.address) as pool:
        assert {s.node for s in pool.slots} == {head.node_id, node2.node_id}  # one actor per node (SPREAD)
        killer = threading.Thread(target=lose_node2, args=(pool,))
        killer.start()
        try:
            run.train(on_update=lambda row: first_update.set(), workers=pool)
        finally:
            first_update.set()
            finished.set()
            killer.join()
        nodes_played = {node for _, node in pool.episode_nodes}
        assert killed and pool.restarts >= 1
        assert {s.node for s in pool.slots} == {head.node_id}  # the lost actor was replaced on the head
    assert nodes_played == {head.node_id, node2.node_id}
    # the episode in flight on the lost node was replayed: the same learning as the uninterrupted local run
    for name in ("metrics.csv", "evaluations.csv"):
        assert _rows(run.folder, name) == _rows(local, name), name
    ray_params, local_params = (load_checkpoint(f / "latest.pt")["learner"]["actor"] for f in (run.folder, local))
    assert all(torch.equal(ray_params[k], local_params[k]) for k in local_params)


SWEEP = """[sweep]
algos = ["ippo", "mappo"]
scenarios = ["grid2x2"]
seeds = [0]
steps = 240
workers = 1
eval_every = 1
eval_episodes = 1
heuristics_episodes = 1

[env]
episode_seconds = 300
"""


@pytest.mark.slow
def test_a_sweep_runs_its_steps_as_tasks_on_both_nodes(cluster, node2, reled, tmp_path):
    sweep = tmp_path / "tiny.toml"
    sweep.write_text(SWEEP)
    out = tmp_path / "out"
    proc = reled("sweep", str(sweep), "--out", str(out), "--ray-address", cluster.address, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted(e["step"] for e in log) == ["heuristics-grid2x2-moderate", "ippo-grid2x2-moderate-s0",
                                              "mappo-grid2x2-moderate-s0"]
    assert all(e["rc"] == 0 for e in log)
    assert {e["node"] for e in log} == {cluster.nodes[0].node_id, node2.node_id}  # tasks on both nodes
    for run in ("ippo-grid2x2-moderate-s0", "mappo-grid2x2-moderate-s0"):
        assert json.loads((out / "runs" / run / "summary.json").read_text())["finished"], run
    assert {row["setting"] for row in json.loads((out / "compare.json").read_text())} == {
        "ippo grid2x2/moderate", "mappo grid2x2/moderate"}
    # run again: everything is done, nothing runs and nothing is logged
    again = reled("sweep", str(sweep), "--out", str(out), "--ray-address", cluster.address, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reled train" not in again.stdout and "reled eval" not in again.stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == len(log)
