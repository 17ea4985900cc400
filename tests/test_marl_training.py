"""Training on real SUMO: determinism, exact resume, worker crashes, Ctrl-C, and learning on a grid."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from trainer.controllers import make_controller
from trainer.env import EnvConfig
from trainer.evaluate import evaluate, summarise
from trainer.marl.checkpoint import load_checkpoint
from trainer.marl.config import load_train_config
from trainer.marl.run_folder import CsvLog
from trainer.marl.training import TrainingRun
from trainer.marl.workers import ActorSpec, EpisodeJob, ProcessWorkers
from trainer.scenarios import get_scenario

SHORT = {"episode_seconds": 300.0}  # 30 decisions × 4 agents per grid2x2 episode


def _config(**train):
    return load_train_config(None, train={"scenario": "grid2x2", "workers": 2, "eval_every": 2,
                                          "eval_episodes": 1, **train}, env=SHORT)


def _first_update_losses(folder: Path, algo: str, seed: int, **train) -> dict[str, str]:
    run = TrainingRun.create(folder, _config(algo=algo, seed=seed, steps=240, **train))
    run.train()
    row = CsvLog(folder / "metrics.csv").read()[0]
    return {k: v for k, v in row.items() if k.startswith("loss/") or k in ("approx_kl", "grad_norm")}


@pytest.mark.parametrize("algo", ["ippo", "mappo"])
def test_same_seed_same_first_update_losses(tmp_path, algo):
    first = _first_update_losses(tmp_path / "a", algo, seed=3)
    again = _first_update_losses(tmp_path / "b", algo, seed=3)
    other = _first_update_losses(tmp_path / "c", algo, seed=4)
    assert first == again
    assert first != other  # the comparison can fail: another seed gives other losses


def test_ray_actors_give_the_first_update_losses_of_local_workers(tmp_path):
    """Episodes are seeded by their job, not by who plays them: Ray actors (a private Ray here) learn the same."""
    local = _first_update_losses(tmp_path / "local", "ippo", seed=3)
    on_ray = _first_update_losses(tmp_path / "ray", "ippo", seed=3, backend_workers="ray")
    assert on_ray == local
    final = [[r["avg_delay"] for r in CsvLog(tmp_path / run / "evaluations.csv").read()] for run in ("local", "ray")]
    assert final[0] == final[1] and len(final[0]) == 10  # the final greedy episodes, played by the actors too


def _params(folder: Path) -> dict[str, torch.Tensor]:
    learner = load_checkpoint(folder / "latest.pt")["learner"]
    return {f"{part}.{k}": v for part in ("actor", "critic") for k, v in learner[part].items()}


def _interrupt_after(update: int):
    def hook(row: dict) -> None:
        if row["update"] == update:
            raise KeyboardInterrupt  # what Ctrl-C does, at the worst moment: right after a checkpoint
    return hook


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    TrainingRun.create(straight, _config(steps=960)).train()  # 4 updates of 2 episodes × 120 agent-steps
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        TrainingRun.create(split, _config(steps=960)).train(_interrupt_after(3))
    resumed = TrainingRun.resume(split)
    assert resumed.progress.updates == 3
    resumed.train()
    a, b = _params(straight), _params(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    _assert_same_logs(straight, split)
    assert len(CsvLog(split / "metrics.csv").read()) == 4


def _assert_same_logs(a: Path, b: Path) -> None:
    timing = {"wall_seconds", "collect_seconds", "learn_seconds", "overlapped_collect_seconds", "sim_seconds",
              "policy_seconds"}
    for name in ("metrics.csv", "evaluations.csv"):
        rows_a, rows_b = CsvLog(a / name).read(), CsvLog(b / name).read()
        assert [{k: v for k, v in r.items() if k not in timing} for r in rows_a] == \
               [{k: v for k, v in r.items() if k not in timing} for r in rows_b]


def test_overlapped_collection_is_exact_across_resume_and_worker_counts(tmp_path):
    """--overlap: the next batch is played while the learner updates, by the weights the update started from.
    A run interrupted after update 3 and resumed with 1 worker instead of 2 ends with the same weights and logs
    as one run straight through; and the overlap changes what is learned (batch 2 is played by the first
    weights, not by the once-updated ones), so the comparison can fail."""
    straight = tmp_path / "straight"
    TrainingRun.create(straight, _config(steps=960, overlap=True)).train()
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        TrainingRun.create(split, _config(steps=960, overlap=True)).train(_interrupt_after(3))
    assert "behaviour_actor" in load_checkpoint(split / "latest.pt")
    TrainingRun.resume(split, workers=1).train()
    a, b = _params(straight), _params(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    _assert_same_logs(straight, split)
    rows = CsvLog(straight / "metrics.csv").read()
    assert all(float(r["overlapped_collect_seconds"]) > 0 for r in rows[:-1])  # collected during the update
    assert float(rows[-1]["overlapped_collect_seconds"]) == 0  # nothing follows the last update

    plain = tmp_path / "plain"
    TrainingRun.create(plain, _config(steps=960)).train()
    first_plain, first_overlap = CsvLog(plain / "metrics.csv").read()[0], rows[0]
    assert first_plain["loss/policy"] == first_overlap["loss/policy"]  # batch 1 is played by the same weights
    assert any(not torch.equal(v, _params(plain)[k]) for k, v in a.items())


@pytest.mark.parametrize("victim", ["worker", "traci-sumo"])
def test_a_crash_mid_episode_restarts_the_worker_and_replays_the_episode(caplog, kill_while_playing, victim):
    spec = ActorSpec(16, 1, True)
    env = EnvConfig(scenario="grid3x3", backend="traci" if victim == "traci-sumo" else "libsumo")
    with ProcessWorkers(1, env, spec) as pool:
        actor_state = spec.build().state_dict()
        reference = pool.collect(actor_state, [EpisodeJob(seed=5)])[0]
        worker = pool.workers[0]
        halfway = reference.sim_seconds / 2  # well past SUMO's start, well before the end
        if victim == "worker":
            killer = kill_while_playing(worker, lambda: worker.process.pid, halfway)
        else:  # the SUMO child process that TraCI talks to
            killer = kill_while_playing(worker, lambda: next(
                c.pid for c in psutil.Process(worker.process.pid).children() if "sumo" in c.name()), halfway)
        with caplog.at_level(logging.WARNING, logger="trainer.marl.workers"):
            replayed = pool.collect(actor_state, [EpisodeJob(seed=5)])[0]
        killer.join()
        assert pool.restarts == 1 and pool.workers[0] is not worker
        assert "during an episode; restarting it and replaying the episode" in caplog.text
        if victim == "worker":
            assert worker.process.exitcode == -signal.SIGKILL
        else:
            assert "SUMO failed in worker 0" in caplog.text
    # the dropped partial episode was replayed from the start with the same seed
    assert np.array_equal(replayed.actions, reference.actions)
    assert replayed.metrics == reference.metrics


@pytest.mark.slow
def test_short_training_on_a_grid_beats_a_random_policy(tmp_path):
    cfg = load_train_config(None, train={"scenario": "grid2x2", "steps": 720 * 40, "workers": 2,
                                         "eval_every": 10, "eval_episodes": 2, "seed": 1})
    TrainingRun.create(tmp_path / "run", cfg).train()
    rows = CsvLog(tmp_path / "run" / "evaluations.csv").read()
    learned = float(np.mean([float(r["avg_delay"]) for r in rows if r["final"] == "1"]))
    random_delay = summarise(evaluate(get_scenario("grid2x2"), [make_controller("random")], list(range(10)),
                                      EnvConfig(scenario="grid2x2")), "avg_delay")["random"][0]
    assert learned < 0.8 * random_delay, (learned, random_delay)


def test_cli_train_eval_policy_and_compare(assert_one_line_error, reled, tmp_path):
    runs = tmp_path / "runs"
    for seed in ("0", "1"):
        proc = reled("train", "--scenario", "grid2x2", "--steps", "240", "--episode-seconds", "300",
                     "--eval-every", "1", "--eval-episodes", "1", "--seed", seed, "--runs-dir", str(runs))
        assert proc.returncode == 0, proc.stderr
        assert "last-10 eval delay" in proc.stdout
    run = runs / "ippo-grid2x2-moderate-s0"
    for name in ("config.toml", "latest.pt", "best.pt", "metrics.csv", "evaluations.csv", "summary.json",
                 "curves.png"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    proc = reled("eval", "--scenario", "grid2x2", "--policy", str(run / "best.pt"), "--controller", "greedy",
                 "--seeds", "2", "--episode-seconds", "300")
    assert proc.returncode == 0, proc.stderr
    assert "ippo:ippo-grid2x2-moderate-s0/best" in proc.stdout and "greedy" in proc.stdout
    assert "trained with signal timing" not in proc.stderr
    proc = reled("eval", "--scenario", "grid2x2", "--policy", str(run / "best.pt"), "--seeds", "1",
                 "--episode-seconds", "300", "--all-red", "0")
    assert proc.returncode == 0 and "trained with signal timing" in " ".join(proc.stderr.split()), proc.stderr
    png = tmp_path / "compare.png"
    proc = reled("compare", str(run), str(runs / "ippo-grid2x2-moderate-s1"), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "ippo grid2x2/moderate" in proc.stdout and "0,1" in proc.stdout
    assert png.stat().st_size > 10_000
    # a checkpoint used on another scenario is refused before any shape error
    assert_one_line_error(reled("eval", "--scenario", "grid3x3", "--policy", str(run / "best.pt")),
                          "trained on scenario grid2x2", "not on grid3x3")
    # an existing run is not overwritten
    assert_one_line_error(reled("train", "--scenario", "grid2x2", "--runs-dir", str(runs)), "--resume")


def test_a_folder_scenario_keeps_one_identity_through_train_eval_and_export(assert_one_line_error, reled,
                                                                           tmp_path):
    """A run trained on a folder given by a relative path is recognised by `reled eval --policy` and `reled export`
    whether the folder is named the same way or by its absolute path; another scenario is refused unless
    --zero-shot, which then says where the policy was trained, in the table and in the JSON."""
    shutil.copytree(get_scenario("grid2x2").folder, tmp_path / "corridor")
    trained = reled("train", "--scenario", "corridor", "--steps", "240", "--episode-seconds", "300", "--name", "r",
                    cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    best = tmp_path / "runs" / "r" / "best.pt"
    for scenario in ("corridor", str(tmp_path / "corridor")):
        proc = reled("eval", "--scenario", scenario, "--policy", str(best), "--seeds", "1", "--episode-seconds", "300",
                     cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "ippo:r/best" in proc.stdout and "zero-shot" not in proc.stdout
    proc = reled("export", "--run", str(best.parent), "--out", str(tmp_path / "p.onnx"), "--holdout-decisions", "20",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "corridor · 4 lights" in proc.stdout
    elsewhere = ("eval", "--scenario", "grid3x3", "--policy", str(best), "--seeds", "1", "--episode-seconds", "300")
    folder = str(tmp_path / "corridor")  # the run records the folder's absolute path, its identity
    assert_one_line_error(reled(*elsewhere, cwd=tmp_path), f"trained on scenario {folder} (4 lights)",
                          "not on grid3x3 (9 lights)", "--zero-shot")
    report = tmp_path / "zero.json"
    proc = reled(*elsewhere, "--zero-shot", "--json", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    label = "ippo:r/best (zero-shot from corridor)"
    assert label in proc.stdout
    data = json.loads(report.read_text())
    assert data["scenario"] == "grid3x3" and list(data["summary"]["avg_delay"]) == [label]
    assert data["policies"] == {label: {"checkpoint": str(best), "trained_on": folder, "zero_shot": True}}
    # --resume from another directory finds the folder too
    proc = reled("train", "--resume", str(best.parent), "--steps", "480", cwd=tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    assert_one_line_error(reled("eval", "--scenario", "grid3x3", "--zero-shot"), "--policy")


def test_show_config_prints_every_default_and_the_flags(reled):
    proc = reled("train", "--algo", "mappo", "--steps", "1234", "--show-config")
    assert proc.returncode == 0, proc.stderr
    assert 'algo = "mappo"' in proc.stdout and "steps = 1234" in proc.stdout
    assert "[ppo]" in proc.stdout and "entropy_coef = 0.01" in proc.stdout


def test_cli_bad_training_input(assert_one_line_error, reled, tmp_path):
    assert_one_line_error(reled("train", "--algo", "qmix"), "unknown algorithm 'qmix'")
    assert_one_line_error(reled("train", "--backend-workers", "slurm"), "unknown --backend-workers 'slurm'",
                          "local, ray")
    assert_one_line_error(reled("train", "--scenario", "atlantis", "--runs-dir", str(tmp_path)), "atlantis")
    config = tmp_path / "bad.toml"
    config.write_text("[ppo]\nclip_range = 0.3\n")
    assert_one_line_error(reled("train", "--config", str(config)), "unknown key(s) ['clip_range'] in [ppo]")
    config.write_text("[train]\nsteps = 1.5\n")
    assert_one_line_error(reled("train", "--config", str(config)), "steps = 1.5 should be int")
    assert_one_line_error(reled("train", "--resume", str(tmp_path / "nothing")), "not a training run")
    assert_one_line_error(reled("compare", str(tmp_path / "nothing")), "not a run folder")


def _default_sigint() -> None:
    """A shell's background job (`cmd &`) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt: give the run the disposition a terminal user's process has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_every_worker_and_the_run_resumes(reled_command, reled, spawn, wait_until, tmp_path):
    runs = tmp_path / "runs"
    proc = spawn([*reled_command, "train", "--scenario", "grid2x2", "--steps", "100000", "--runs-dir", str(runs),
                  "--name", "r", "--backend", "traci"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 preexec_fn=_default_sigint)
    latest = runs / "r" / "latest.pt"

    def checkpoint_written() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"reled train exited early: {proc.communicate()[1][-3000:]}")
        return latest.exists()
    wait_until(checkpoint_written, 300, "the first checkpoint")

    def sumo_children() -> list[psutil.Process]:  # TraCI: SUMO is a child of each worker
        sumos = [c for c in psutil.Process(proc.pid).children(recursive=True) if "sumo" in c.name()]
        return sumos if len(sumos) >= 2 else []
    # workers between two episodes have no SUMO for a moment: wait until both run one
    children = wait_until(sumo_children, 120, "a SUMO process under each of the 2 workers")
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # show where it hung instead of a bare timeout
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"reled train did not stop within 180 s of SIGINT; stderr:\n{err[-3000:]}")
    assert proc.returncode == 130, err
    assert "--resume" in err
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.info for c in alive]
    done = load_checkpoint(latest)["progress"]["updates"]
    resumed = reled("train", "--resume", str(runs / "r"), "--steps", str((done + 1) * 1440))
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(latest)["progress"]["updates"] == done + 1


def _file_size_limit(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint(reled_command, assert_one_line_error, reled,
                                                                   tmp_path):
    runs = tmp_path / "runs"
    args = ["--scenario", "grid2x2", "--episode-seconds", "300", "--eval-every", "1", "--eval-episodes", "1"]
    assert reled("train", *args, "--steps", "240", "--runs-dir", str(runs), "--name", "r").returncode == 0
    latest = runs / "r" / "latest.pt"
    before = latest.read_bytes()
    # the OS refuses files larger than 64 KiB: the next checkpoint (about 100 KiB) cannot be written
    proc = subprocess.run([*reled_command, "train", "--resume", str(runs / "r"), "--steps", "480"], capture_output=True,
                          text=True, timeout=300, preexec_fn=_file_size_limit(64 * 1024))
    assert_one_line_error(proc, "could not write checkpoint", "File too large", "previous checkpoint is intact")
    assert latest.read_bytes() == before
    assert not [p for p in (runs / "r").iterdir() if p.name.endswith(".tmp")]
    assert reled("train", "--resume", str(runs / "r"), "--steps", "480").returncode == 0
    assert load_checkpoint(latest)["progress"]["updates"] == 2
