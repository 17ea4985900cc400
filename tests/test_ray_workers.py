"""Rollout workers as Ray actors on a private Ray: crashes replayed, scenario errors named, Ray as an optional extra."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from edge_runtime import __version__
from edge_runtime.errors import RELEDError
from trainer.env import EnvConfig
from trainer.marl.ray_workers import RayWorkers
from trainer.marl.workers import ActorSpec, EpisodeJob
from trainer.ray_session import LOCAL_OBJECT_STORE_BYTES, check_same_code, code_identity

SPEC = ActorSpec(16, 1, True)
# `reled` in an interpreter where `import ray` fails, as where the extra is not installed
WITHOUT_RAY = [sys.executable, "-c", "import runpy, sys; sys.modules['ray'] = None; sys.argv[0] = 'reled'; "
               "runpy.run_module('trainer', run_name='__main__')"]


@pytest.fixture(scope="module")
def private_ray() -> Iterator[None]:
    """One private Ray for this module's tests (RayWorkers uses a connection that is already open)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("victim", ["actor", "traci-sumo"])
def test_a_crash_mid_episode_replaces_the_actor_and_replays_the_episode(private_ray, caplog, kill_while_playing,
                                                                         wait_until, victim):
    env = EnvConfig(scenario="grid3x3", backend="traci" if victim == "traci-sumo" else "libsumo")
    with RayWorkers(1, env, SPEC) as pool:
        actor_state = SPEC.build().state_dict()
        reference = pool.collect(actor_state, [EpisodeJob(seed=5)])[0]
        slot = pool.slots[0]
        first_pid = slot.pid
        if victim == "actor":  # the actor's worker process
            killer = kill_while_playing(slot, lambda: first_pid, reference.sim_seconds / 2)
        else:  # the SUMO child process that TraCI talks to
            killer = kill_while_playing(slot, lambda: next(
                c.pid for c in psutil.Process(first_pid).children() if "sumo" in c.name()), reference.sim_seconds / 2)
        with caplog.at_level(logging.WARNING, logger="trainer.marl.ray_workers"):
            replayed = pool.collect(actor_state, [EpisodeJob(seed=5)])[0]
        killer.join()
        assert pool.restarts == 1 and slot.pid not in (0, first_pid)
        assert "during an episode; restarting it and replaying the episode" in caplog.text
        if victim == "traci-sumo":
            assert "SUMO failed in Ray actor" in caplog.text
        wait_until(lambda: not _running(first_pid), 30, "the replaced actor's process to end")
    # the dropped partial episode was replayed from the start with the same seed
    assert np.array_equal(replayed.actions, reference.actions)
    assert replayed.metrics == reference.metrics
    assert replayed.obs.flags.writeable  # a copy of its own, not a view of Ray's object store


def test_an_actor_without_its_scenario_stops_with_one_clear_error(private_ray, wait_until, tmp_path):
    with pytest.raises(RELEDError, match=r"^SUMO worker on Ray node \w+ failed: unknown scenario") as caught:
        RayWorkers(1, EnvConfig(scenario=str(tmp_path / "gone")), SPEC)
    assert "\n" not in str(caught.value)
    # its actor was stopped: both CPUs are free again
    wait_until(lambda: ray.available_resources().get("CPU") == 2, 30, "the failed actor's CPU to be released")


def test_a_node_with_other_code_is_refused():
    here = code_identity()
    assert here.startswith(__version__ + "+") and here == code_identity()  # stable: a digest of the sources
    check_same_code("n1", here, here)
    with pytest.raises(RELEDError, match=r"Ray node n1 runs reled 0\.0\.1\+x, the driver .*install the same reled"):
        check_same_code("n1", "0.0.1+x", here)


def test_without_ray_the_ray_options_are_one_clear_error(assert_one_line_error, tmp_path):
    runs = tmp_path / "runs"
    train = subprocess.run([*WITHOUT_RAY, "train", "--backend-workers", "ray", "--runs-dir", str(runs)],
                           capture_output=True, text=True, timeout=120)
    assert_one_line_error(train, "--backend-workers ray needs Ray", "pip install 'reled[ray]'")
    assert not runs.exists()  # refused before a run folder is written
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text("[sweep]\nsteps = 240\n")
    sweep = subprocess.run([*WITHOUT_RAY, "sweep", str(sweep_file), "--out", str(tmp_path / "out"),
                            "--ray-address", "local"], capture_output=True, text=True, timeout=120)
    assert_one_line_error(sweep, "a sweep on Ray (--ray-address) needs Ray", "pip install 'reled[ray]'")
    assert not (tmp_path / "out").exists()
    # the same interpreter trick leaves a command that does not need Ray working
    assert subprocess.run([*WITHOUT_RAY, "train", "--show-config"], capture_output=True, timeout=120).returncode == 0


def test_a_ray_address_without_a_head_is_one_clear_error_at_once(assert_one_line_error, reled, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    train = reled("train", "--backend-workers", "ray", "--ray-address", f"127.0.0.1:{port}", "--runs-dir",
                  str(tmp_path / "runs"))  # refused before Ray, which would retry for minutes
    assert_one_line_error(train, f"--ray-address 127.0.0.1:{port}: no Ray head answers there", "ray start --head")
    assert not (tmp_path / "runs").exists()
    sweep = reled("sweep", str(Path(__file__).parents[1] / "configs" / "sweep_example.toml"), "--ray-address",
                  "head-without-port", "--out", str(tmp_path / "out"))
    assert_one_line_error(sweep, "--ray-address 'head-without-port' is not local, auto or HOST:PORT")
    assert not (tmp_path / "out").exists()


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_stops_a_ray_run_like_ctrl_c_with_its_private_ray(reled_command, spawn, wait_until, tmp_path):
    runs = tmp_path / "runs"
    proc = spawn([*reled_command, "train", "--backend-workers", "ray", "--scenario", "grid2x2", "--steps", "100000",
                  "--episode-seconds", "300", "--runs-dir", str(runs), "--name", "r"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = runs / "r" / "latest.pt"

    def ray_running() -> list[psutil.Process]:  # the private Ray's daemons and actors are the command's descendants
        if proc.poll() is not None:
            pytest.fail(f"reled train exited early: {proc.communicate()[1][-3000:]}")
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = {_name(p) for p in tree}
        return tree if latest.exists() and {"raylet", "gcs_server"} <= names and \
            sum(n.startswith("ray::Rollout") for n in names) == 2 else []
    tree = wait_until(ray_running, 300, "the first checkpoint with Ray and both rollout actors running")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
