"""Street rollouts in training (`reled update`): screening, sequences, V-trace weights, and one closed-loop update."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, action_mask, feature_size, per_phase_values
from edge_runtime.fileio import atomic_path
from edge_runtime.policy import OnnxPolicy
from edge_runtime.rollouts import SOURCE_FALLBACK, SOURCE_POLICY, Batch, batch_path, pack, unpack
from trainer.marl.checkpoint import actor_from_checkpoint, load_checkpoint
from trainer.marl.config import load_train_config
from trainer.marl.ppo import PPOLearner
from trainer.marl.run_folder import CsvLog, write_config
from trainer.marl.storage import RolloutBatch, gae, vtrace
from trainer.marl.street import KEPT, REASONS, RunLights, StreetRows, screen, street_batch
from trainer.marl.street_update import update_from_street

DELTA = 10.0
LIGHTS = RunLights(["A", "B"], [2, 3])
DEVICES = {"dev-a": "A", "dev-b": "B", "dev-x": "X"}  # X: a light of another scenario


def rows(n: int, *, start: int = 0, phases: int = 2, source: int = SOURCE_POLICY, version: int = 7,
         log_prob: float = -0.5, action: int = 0, obs: np.ndarray | None = None,
         rewards: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``n`` consecutive decisions of one controller, as the device records them."""
    decisions = np.arange(start, start + n)
    return {"decision": decisions, "time": decisions * DELTA,
            "obs": np.ones((n, feature_size()), np.float32) if obs is None else obs,
            "mask": np.tile(action_mask(phases), (n, 1)), "action": np.full(n, action),
            "log_prob": np.full(n, 0.0 if source == SOURCE_FALLBACK else log_prob),
            "override": np.zeros(n, bool), "reward": -np.arange(n, dtype=np.float32) if rewards is None else rewards,
            "source": np.full(n, source), "policy_version": np.full(n, 0 if source == SOURCE_FALLBACK else version)}


def collect(root: Path, device: str, epoch: int, seq: int, columns: dict[str, np.ndarray]) -> None:
    """Write a batch exactly as `reled-edge collect` does: the packed batch, validated, saved once as .npz."""
    batch = unpack(pack(Batch(device, epoch, seq, columns)))
    with atomic_path(batch_path(root, device, epoch, seq)) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **batch.columns)


def test_screening_counts_every_row_by_its_reason(tmp_path):
    collect(tmp_path, "dev-a", 1, 1, rows(10))
    collect(tmp_path, "dev-a", 1, 2, rows(5, start=5))  # resent decisions 5..9
    collect(tmp_path, "dev-a", 1, 3, rows(4, start=10, version=8))  # another model
    collect(tmp_path, "dev-b", 2, 1, rows(6, phases=3, source=SOURCE_FALLBACK))
    collect(tmp_path, "dev-b", 2, 2, rows(3, start=6, phases=2))  # B has 3 phases
    nan = np.ones((2, feature_size()), np.float32)
    nan[1, 3] = np.nan
    collect(tmp_path, "dev-b", 2, 3, {**rows(2, start=9, phases=3, obs=nan), "reward": np.array([np.inf, 0])})
    bad = rows(2, start=11, phases=3, action=1)
    bad["action"][0], bad["log_prob"][1] = 5, 0.5  # a phase outside the mask; a probability above 1
    collect(tmp_path, "dev-b", 2, 4, bad)
    collect(tmp_path, "dev-b", 2, 5, {**rows(1, start=13, phases=3), "source": np.array([4])})
    collect(tmp_path, "dev-x", 3, 1, rows(3))
    collect(tmp_path, "dev-z", 4, 1, rows(2))  # not in the device files
    other_schema = batch_path(tmp_path, "dev-a", 5, 1)
    other_schema.parent.mkdir(parents=True)
    np.savez(other_schema, **{**rows(7), "obs": np.ones((7, 30), np.float32)})
    no_reward = batch_path(tmp_path, "dev-a", 6, 1)
    no_reward.parent.mkdir(parents=True)
    np.savez(no_reward, **{k: v for k, v in rows(4).items() if k != "reward"})
    (tmp_path / "dev-a" / f"{7:016x}").mkdir()
    (tmp_path / "dev-a" / f"{7:016x}" / f"{1:010d}.npz").write_bytes(b"not a zip")

    result = screen(tmp_path, LIGHTS, DEVICES, {7})
    expected = {KEPT: 16, "schema": 7, "malformed": 5, "duplicate": 5, "non_finite": 2, "unknown_device": 2,
                "foreign_light": 3, "phase_count": 3, "lineage": 4, "not_applied": 0, "fallback": 0,
                "invalid_action": 2}
    assert result.counts == expected and list(result.counts) == [KEPT, *REASONS]
    assert result.read == 10 + 5 + 4 + 6 + 3 + 2 + 2 + 1 + 3 + 2 + 7 + 4 == result.kept + result.dropped
    assert len(result.unreadable) == 1 and f"{7:016x}" in result.unreadable[0]
    assert sorted(set(result.rows["agent"].tolist())) == [0, 1]
    without = screen(tmp_path, LIGHTS, DEVICES, {7}, keep_fallback=False)
    assert without.counts["fallback"] == 6 and without.kept == 10 and without.read == result.read
    assert screen(tmp_path / "nothing", LIGHTS, DEVICES, {7}).read == 0
    # a HIL run's fallbacks: dev-a's decisions at t = 20..40 s never reached the heads
    applied = screen(tmp_path, LIGHTS, DEVICES, {7}, not_applied={"dev-a": [(20.0, 40.0)]})
    assert applied.counts["not_applied"] == 3 and applied.kept == result.kept - 3 and applied.read == result.read


def test_sequences_are_cut_at_gaps_in_decisions_and_time(tmp_path):
    late = rows(3, start=4)
    late["time"] = late["time"] + 100.0  # decisions 4..6 after a pause (no reading for 100 s)
    collect(tmp_path, "dev-a", 1, 2, late)
    collect(tmp_path, "dev-a", 1, 1, rows(3))  # 0..2, then decision 3 is missing
    collect(tmp_path, "dev-a", 2, 1, rows(2, start=7))  # another epoch (a new outbox)
    street = StreetRows.from_screening(screen(tmp_path, LIGHTS, DEVICES, {7}).rows, DELTA)
    assert street.continues.tolist() == [True, True, False, True, True, False, True, False]
    assert street.sequences == 3 and street.transitions.tolist() == [0, 1, 3, 4, 6]


def test_vtrace_on_policy_is_gae_and_a_cut_isolates_the_sequences():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=5), rng.normal(size=6)
    adv, ret = gae(torch.tensor(rewards), torch.tensor(values[:5]), torch.tensor(values[5]), 0.9, 0.8)
    last = np.array([False] * 4 + [True])
    a, v, rho = vtrace(rewards, values[:5], values[1:], np.zeros(5), last, 0.9, 0.8, rho_max=1.0)
    assert np.allclose(a, adv.numpy()) and np.allclose(v, ret.numpy()) and (rho == 1).all()
    # a cut after transition 1: the first sequence bootstraps from V(x_2) and ignores what follows
    cut = np.array([False, True, False, False, True])
    a1, v1, _ = vtrace(rewards, values[:5], values[1:], np.zeros(5), cut, 0.9, 0.8, 1.0)
    changed = rewards.copy()
    changed[2:] += 100.0
    a2, v2, _ = vtrace(changed, values[:5], values[1:], np.zeros(5), cut, 0.9, 0.8, 1.0)
    assert np.array_equal(a1[:2], a2[:2]) and np.array_equal(v1[:2], v2[:2]) and not np.allclose(a1[2:], a2[2:])
    assert a1[1] == pytest.approx(rewards[1] + 0.9 * values[2] - values[1])


def test_importance_weights_are_truncated_and_fallback_rows_have_mu_one():
    log_ratios = np.array([math.log(3.0), math.log(0.5), 0.0])
    _, _, rho = vtrace(np.zeros(3), np.zeros(3), np.zeros(3), log_ratios, np.array([False, False, True]), 0.9,
                       0.95, rho_max=1.0)
    assert rho.tolist() == pytest.approx([1.0, 0.5, 1.0])
    learner = PPOLearner(load_train_config(None, train={}), n_agents=1)
    rng = np.random.default_rng(1)
    n = 6
    mask = np.tile(action_mask(2), (n, 1))
    source = np.array([SOURCE_POLICY] * 3 + [SOURCE_FALLBACK] * 3)
    columns = {"decision": np.arange(n), "time": np.arange(n) * DELTA,
               "obs": rng.gamma(2.0, 3.0, (n, feature_size())).astype(np.float32), "mask": mask,
               "action": np.array([0, 1, 0, 1, 0, 1]), "log_prob": np.array([-3.0, -0.1, -0.05, 0, 0, 0]),
               "reward": -rng.random(n).astype(np.float32), "source": source, "device": np.full(n, "dev-a"),
               "epoch": np.ones(n, np.uint64)}
    street = StreetRows.from_screening(columns, DELTA)
    out = street_batch(learner, street, rho_max=1.0)
    assert len(out.rows) == n - 1  # the last row only bootstraps
    pi = learner.actor.distribution(torch.from_numpy(street.obs), torch.from_numpy(mask)).log_prob(
        torch.from_numpy(street.actions)).exp().detach().numpy()[:-1].astype(np.float64)
    mu = np.exp(np.array([-3.0, -0.1, -0.05, 0.0, 0.0]))  # fixed-time rows: μ = 1 (log 0), whatever was recorded
    assert out.rho == pytest.approx(np.minimum(1.0, pi / mu), rel=1e-5)
    assert out.clipped.tolist() == (pi / mu > 1.0).tolist() and out.clipped[0]  # π ≈ 0.5 ≫ e^-3
    assert out.rows.old_log_probs.numpy() == pytest.approx(np.log(mu))
    assert out.rows.is_weight.numpy() == pytest.approx(np.minimum(1.0, mu / pi), rel=1e-5)
    assert not out.rows.from_expert.any()


def test_the_importance_weight_scales_only_the_policy_term_and_defaults_to_one():
    learner = PPOLearner(load_train_config(None, train={}), n_agents=1)
    n = 8
    obs = torch.rand(n, feature_size())
    batch = RolloutBatch(obs=obs, masks=torch.from_numpy(np.tile(action_mask(3), (n, 1))),
                         actions=torch.arange(n) % 3, old_log_probs=torch.full((n,), -1.5),
                         advantages=torch.linspace(-1, 1, n), returns=torch.ones(n), critic_in=obs,
                         from_expert=torch.zeros(n, dtype=torch.bool), weight=torch.zeros(n))
    assert torch.equal(batch.is_weight, torch.ones(n))
    plain = learner.loss_terms(batch)
    batch.is_weight = torch.full((n,), 2.0)
    doubled = learner.loss_terms(batch)
    assert doubled["policy"].item() == pytest.approx(2 * plain["policy"].item())
    assert doubled["value"].item() == plain["value"].item() and doubled["entropy"].item() == plain["entropy"].item()


def test_a_metrics_log_gains_street_columns_without_losing_rows(tmp_path):
    log = CsvLog(tmp_path / "metrics.csv")
    log.append({"update": 1, "loss": 0.5})
    log.widen(["update", "street_rows"])
    log.append({"update": 2, "loss": 0.25, "street_rows": 40})
    assert log.read() == [{"update": "1", "loss": "0.5", "street_rows": ""},
                          {"update": "2", "loss": "0.25", "street_rows": "40"}]


def test_update_refuses_mappo_runs_and_bad_settings(tmp_path):
    write_config(tmp_path / "run", load_train_config(None, train={"algo": "mappo"}))
    with pytest.raises(RELEDError, match="MAPPO run"):
        update_from_street(tmp_path / "run", tmp_path, {}, {1})
    with pytest.raises(RELEDError, match="street-share"):
        update_from_street(tmp_path / "run", tmp_path, {}, {1}, street_share=1.0)
    with pytest.raises(RELEDError, match="does not exist"):
        update_from_street(tmp_path / "run", tmp_path / "nope", {}, {1})
    write_config(tmp_path / "ippo", load_train_config(None, train={}))
    with pytest.raises(RELEDError, match="already exists"):
        update_from_street(tmp_path / "ippo", tmp_path, {}, {1}, out=tmp_path / "run")


def test_cli_update_asks_for_the_run_s_versions_in_one_line(assert_one_line_error, reled, tmp_path):
    args = ("update", "--run", str(tmp_path), "--rollouts", str(tmp_path), "--devices", str(tmp_path))
    assert_one_line_error(reled(*args), "--version V")
    assert_one_line_error(reled(*args, "--version", "1"), "not a training run")


# -- the closed loop on a real run ------------------------------------------------------------------
def _street_rollouts(run: Path, root: Path, version: int) -> dict[str, int]:
    """What four controllers of grid2x2 would send back after driving one (short) episode with the run's policy
    greedily, plus what screening must drop; returns the expected count of each dropped reason."""
    from trainer.env import EnvConfig, TrafficSignalEnv
    from trainer.marl.policy import PolicyController
    from trainer.rollout import play_episode

    actor = actor_from_checkpoint(load_checkpoint(run / "latest.pt"))
    env = TrafficSignalEnv(EnvConfig(scenario="grid2x2", episode_seconds=300.0))
    try:
        episode = play_episode(env, PolicyController(actor), seed=4242)
        agents, n_phases = list(env.possible_agents), [i.n_phases for i in env.intersections]
    finally:
        env.close()
    steps = len(episode.obs)
    with torch.no_grad():
        log_probs = actor.distribution(torch.from_numpy(episode.obs.reshape(-1, feature_size())),
                                       torch.from_numpy(episode.masks.reshape(-1, MAX_PHASES))).log_prob(
            torch.from_numpy(episode.actions.reshape(-1))).reshape(steps, -1).numpy()
    for k, (light, phases) in enumerate(zip(agents, n_phases, strict=True)):
        obs = episode.obs[:, k]
        columns = {"decision": np.arange(1, steps + 1), "time": np.arange(steps) * DELTA, "obs": obs,
                   "mask": episode.masks[:, k], "action": episode.actions[:, k], "log_prob": log_probs[:, k],
                   "override": np.zeros(steps, bool),
                   "reward": -per_phase_values(obs, phases)[:, :, 0].sum(-1),  # the device's: minus its queue
                   "source": np.full(steps, SOURCE_POLICY), "policy_version": np.full(steps, version)}
        if k == 1:  # the last 5 decisions in fallback (fixed-time plan, version 0), which are kept
            columns["source"][-5:], columns["policy_version"][-5:], columns["log_prob"][-5:] = SOURCE_FALLBACK, 0, 0
        if k == 2:  # the first 4 decisions by a model of another run
            columns["policy_version"][:4] = version + 1
        epoch = 100 + k
        half = steps // 2
        collect(root, f"dev-{light.lower()}", epoch, 1, {c: v[:half] for c, v in columns.items()})
        collect(root, f"dev-{light.lower()}", epoch, 2, {c: v[half:] for c, v in columns.items()})
        if k == 0:  # batch 1 again, under another sequence number
            collect(root, f"dev-{light.lower()}", epoch, 3, {c: v[:half] for c, v in columns.items()})
    stray = batch_path(root, "dev-a0", 999, 1)  # a controller still on schema of another feature size
    stray.parent.mkdir(parents=True)
    np.savez(stray, **{**columns, "obs": np.ones((steps, 20), np.float32)})
    return {"duplicate": steps // 2, "lineage": 4, "schema": steps}


def _device_files(folder: Path, lights: list[str]) -> None:
    folder.mkdir()
    for light in lights:
        (folder / f"{light}.toml").write_text(
            f'[device]\nid = "dev-{light.lower()}"\nintersection = "{light}"\nstate_dir = "state"\n\n'
            '[signal]\ngreen_phases = ["GGrr", "rrGG"]\n')


def test_reled_update_learns_from_street_rollouts_and_exports_a_newer_policy(reled, tmp_path):
    from trainer.marl.training import TrainingRun

    run = tmp_path / "run"
    TrainingRun.create(run, load_train_config(None, train={"scenario": "grid2x2", "steps": 120, "workers": 2,
                                                           "episodes_per_update": 1, "eval_episodes": 1},
                                              env={"episode_seconds": 300.0})).train()
    first = reled("export", "--run", str(run), "--out", str(tmp_path / "v0.onnx"), "--holdout-decisions", "4")
    assert first.returncode == 0, first.stderr
    deployed = OnnxPolicy(tmp_path / "v0.onnx").meta.policy_version
    rollouts = tmp_path / "rollouts"
    dropped = _street_rollouts(run, rollouts, deployed)
    _device_files(tmp_path / "devices", ["A0", "A1", "B0", "B1"])
    before = actor_from_checkpoint(load_checkpoint(run / "latest.pt"))

    proc = reled("update", "--run", str(run), "--rollouts", str(rollouts), "--devices", str(tmp_path / "devices"),
                 "--version", str(deployed), "--json", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stderr
    assert "duplicate" in proc.stdout and "greedy actions changed" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    counts = report["counts"]
    assert {k: counts[k] for k in dropped} == dropped
    assert counts[KEPT] + report["dropped"] == report["read"] == sum(counts.values())
    assert report["read"] == 4 * 30 + dropped["duplicate"] + dropped["schema"]  # 4 lights' episodes, resent, stray
    assert counts[KEPT] == 4 * 30 - 4 and report["transitions"] > 0 and report["updates"] == 2
    assert report["street_rows"] == [report["transitions"]] and 0 < report["street_share"][0] <= 0.5
    assert report["param_distance"] > 0 and 0 < report["rho_mean"] <= 1
    after = actor_from_checkpoint(load_checkpoint(run / "latest.pt"))
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))
    assert torch.equal(next(actor_from_checkpoint(load_checkpoint(run / "best.pt")).parameters()),
                       next(after.parameters()))  # what `reled export --run` picks
    metrics = CsvLog(run / "metrics.csv").read()
    assert [m["street_rows"] for m in metrics] == ["", str(report["street_rows"][0])]
    assert all(m["rho_mean"] and m["rho_clipped_fraction"] and m["street_share"] for m in metrics[1:])

    second = reled("export", "--run", str(run), "--out", str(tmp_path / "v1.onnx"), "--holdout-decisions", "4")
    assert second.returncode == 0, second.stderr
    assert OnnxPolicy(tmp_path / "v1.onnx").meta.policy_version > deployed
