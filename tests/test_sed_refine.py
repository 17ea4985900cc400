"""SED end to end with the real embedded model on a small grid: generate, show, load, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.features import feature_size
from trainer.sed.store import load_demos


@pytest.mark.slow
def test_refinement_rounds_run_end_to_end_on_a_small_grid(assert_one_line_error, reled, tmp_path: Path):
    out = tmp_path / "demos"
    # a generous per-call limit: on a loaded CI machine a 30 s answer is late, which is not what this checks
    proc = reled("demos", "generate", "--scenario", "grid2x2", "--mode", "plan", "--rounds", "2", "--candidates", "2",
                 "--episode-seconds", "900", "--horizon", "300", "--llm-timeout", "600", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "kept demonstration per subset" in proc.stdout and "max-pressure" in proc.stdout

    demos = load_demos(out, scenario="grid2x2", agents=["A0", "A1", "B0", "B1"])
    manifest = demos.manifest
    assert manifest["mode"] == "plan" and manifest["prompt_version"] == "plan/1"
    assert len(manifest["model"]["sha256"]) == 64
    assert len(manifest["rounds"]) == 2 and all(len(r["candidates"]) == 2 for r in manifest["rounds"])
    assert manifest["llm_totals"]["calls"] == 4 * 3  # 4 episodes x 1 subset x 3 plans (900 s / 300 s)
    totals = manifest["llm_totals"]
    assert totals["late"] == 0 and totals["failed"] == 0, totals
    assert totals["invalid"] == 0 and totals["validity"] == 1.0  # grammar-constrained: every answer is a valid plan
    # round 1's prompts carry feedback computed from round 0's measurements
    assert "Longest wait" in manifest["rounds"][1]["feedback"]["0"]
    # the kept demonstration is the best-scoring one over every round and candidate
    scores = [c["subsets"][0]["score"] for r in manifest["rounds"] for c in r["candidates"]]
    assert manifest["kept"][0]["score"] == pytest.approx(max(scores))
    kept = manifest["kept"][0]
    assert 0 <= kept["divergence"] <= 1 and kept["epsilon"] >= 0 and kept["bound"] > 0
    # columns: 4 lights x 90 decisions of the kept episode, observations in the trainer's schema
    assert len(demos) == 4 * 90 and demos.columns["obs"].shape == (360, feature_size())
    assert set(np.unique(demos.columns["round"])) <= {0, 1}
    assert np.all(demos.columns["mask"][np.arange(360), demos.columns["action"]])  # expert actions are valid

    shown = reled("demos", "show", str(out), "--plot", str(tmp_path / "rounds.png"))
    assert shown.returncode == 0, shown.stderr
    assert "demonstrations per round" in shown.stdout and (tmp_path / "rounds.png").stat().st_size > 10_000

    again = reled("demos", "generate", "--scenario", "grid2x2", "--out", str(out))  # refuses, writes nothing
    assert_one_line_error(again, "exists")
    assert load_demos(out).manifest["created"] == manifest["created"]


@pytest.mark.slow
def test_llm_expert_as_a_controller_in_eval(reled, tmp_path: Path):
    proc = reled("eval", "--scenario", "grid2x2", "--controller", "fixed,llm", "--llm-mode", "step", "--seeds", "1",
                 "--episode-seconds", "200", "--json", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stderr
    assert "LLM expert: 20 calls, 100% valid" in proc.stdout  # 200 s / 10 s decisions, one subset
    controllers = [e["controller"] for e in json.loads((tmp_path / "eval.json").read_text())["episodes"]]
    assert controllers == ["fixed", "llm"]


def test_bad_model_and_foreign_demo_folders_are_one_line_errors(assert_one_line_error, reled, tmp_path: Path):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    proc = reled("demos", "generate", "--scenario", "grid2x2", "--llm-model", str(bad), "--out", str(tmp_path / "d"))
    assert_one_line_error(proc, "not a GGUF model")
    assert not (tmp_path / "d").exists()
    assert_one_line_error(reled("demos", "show", str(tmp_path)), "not a demonstration folder")
    assert_one_line_error(reled("demos", "generate", "--scenario", "grid2x2", "--mode", "poem"),
                          "choose verified, plan, step")
