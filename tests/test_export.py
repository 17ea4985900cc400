"""`reled export`: a trained run to ONNX, parity with torch, int8, and the metadata controllers check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_runtime.policy import OnnxPolicy
from trainer.marl.checkpoint import actor_from_checkpoint, load_checkpoint


@pytest.mark.slow
def test_export_a_trained_run_with_int8(reled, tmp_path):
    runs = tmp_path / "runs"
    trained = reled("train", "--scenario", "grid2x2", "--steps", "240", "--episode-seconds", "300",
                    "--runs-dir", str(runs), "--name", "r")
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "policy.onnx"
    proc = reled("export", "--run", str(runs / "r"), "--out", str(out), "--int8", "--policy-version", "42",
                 "--holdout-decisions", "30")
    assert proc.returncode == 0, proc.stderr
    assert "100.00%" in proc.stdout  # fp32 actions identical to torch on every held-out observation
    fp32, int8 = OnnxPolicy(out), OnnxPolicy(tmp_path / "policy.int8.onnx")
    assert (fp32.meta.policy_version, fp32.meta.precision, int8.meta.precision) == (42, "fp32", "int8")
    assert sorted(fp32.meta.phase_tables) == ["A0", "A1", "B0", "B1"] and fp32.meta.scenario == "grid2x2"
    assert fp32.self_test() is None and int8.self_test() is None
    assert (tmp_path / "policy.int8.onnx").stat().st_size < out.stat().st_size

    actor = actor_from_checkpoint(load_checkpoint(runs / "r" / "best.pt"))
    rng = np.random.default_rng(0)
    obs = rng.gamma(2.0, 5.0, size=(256, 34)).astype(np.float32)
    mask = np.zeros((256, 8), dtype=bool)
    mask[:, :2] = True
    logits, actions = fp32.run(obs, mask)
    with torch.no_grad():
        expected = actor(torch.from_numpy(obs), torch.from_numpy(mask)).numpy()
    assert np.abs(logits[mask] - expected[mask]).max() < 1e-4
    assert np.array_equal(actions, expected.argmax(1))
    decision = fp32.decide(obs[0], mask[0])
    assert decision.action in (0, 1) and decision.log_prob <= 0


def test_export_refuses_bad_input_and_writes_nothing(assert_one_line_error, reled, tmp_path):
    out = tmp_path / "p.onnx"
    assert_one_line_error(reled("export", "--out", str(out)), "--run", "--scenario")
    assert_one_line_error(reled("export", "--out", str(tmp_path / "p.txt"), "--scenario", "grid2x2"), "end in .onnx")
    assert_one_line_error(reled("export", "--out", str(out), "--run", str(tmp_path / "nope")), "does not exist")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(reled("export", "--out", str(out), "--run", str(tmp_path / "junk.pt")),
                          "not a RELED checkpoint")
    assert_one_line_error(reled("export", "--out", str(out), "--scenario", "atlantis"), "atlantis")
    assert not out.exists() and not list(tmp_path.glob(".p.onnx*"))
