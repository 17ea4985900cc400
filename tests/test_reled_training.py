"""`reled train --algo reled` on real SUMO: demonstrations in the run, SED passes, exact resume, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer.env import EnvConfig
from trainer.marl.checkpoint import load_checkpoint
from trainer.marl.config import load_train_config
from trainer.marl.curves import hpo_curves
from trainer.marl.run_folder import CsvLog
from trainer.marl.training import TrainingRun
from trainer.sed.generate import GenerateRequest, generate
from trainer.sed.llm import LLMSettings
from trainer.sed.refine import RefineConfig

SHORT = {"episode_seconds": 300.0}  # 30 decisions × 4 agents per grid2x2 episode
TIMING_COLUMNS = {"wall_seconds", "collect_seconds", "learn_seconds", "sim_seconds", "policy_seconds", "hpo_seconds",
                  "sed_seconds"}


@pytest.fixture(scope="session")
def grid_demos(tmp_path_factory) -> Path:
    """Verified demonstrations (the classical tools: no model needed) for grid2x2's short episodes, seed 0."""
    out = tmp_path_factory.mktemp("demos") / "grid2x2"
    request = GenerateRequest(env=EnvConfig(scenario="grid2x2", **SHORT), llm=LLMSettings(),
                              refine=RefineConfig(seed=0), no_llm=True, baselines=False)
    generate(request, out, overwrite=False)
    return out


def _poor_copy(demos: Path, dest: Path) -> Path:
    """The same rows with a very poor declared return G_j: the first SED pass must replace them."""
    shutil.copytree(demos, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for kept in manifest["kept"]:
        kept["ret"] = -1e6
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _config(demos: Path, **train):
    return load_train_config(None, train={"algo": "reled", "scenario": "grid2x2", "workers": 2, "eval_every": 2,
                                          "eval_episodes": 1, "steps": 960, **train},
                             hpo={"demos": str(demos), "sed_every": 2, "sed_llm": False}, env=SHORT)


def _interrupt_after(update: int):
    def hook(row: dict) -> None:
        if row["update"] == update:
            raise KeyboardInterrupt
    return hook


def _without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


@pytest.mark.parametrize("stop_after", [2, 3])  # right after the SED pass's checkpoint, and one update later
def test_a_reled_run_resumes_exactly_with_its_demonstrations(grid_demos, tmp_path, stop_after):
    demos = _poor_copy(grid_demos, tmp_path / "poor")
    straight = tmp_path / "straight"
    TrainingRun.create(straight, _config(demos)).train()  # 4 updates, a SED pass after update 2
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        TrainingRun.create(split, _config(demos)).train(_interrupt_after(stop_after))
    resumed = TrainingRun.resume(split)
    assert resumed.progress.updates == stop_after and resumed.progress.demos_version == 1
    resumed.train()
    a, b = load_checkpoint(straight / "latest.pt"), load_checkpoint(split / "latest.pt")
    for part in ("actor", "critic"):
        for key, value in a["learner"][part].items():
            assert torch.equal(value, b["learner"][part][key]), f"{part}.{key}"
    assert a["hpo"] == b["hpo"] and a["hpo"]["distance_count"] == 4 * 4  # 4 updates × 4 agents
    for name in ("metrics.csv", "evaluations.csv", "hpo.csv", "sed.csv"):
        assert _without_timing(CsvLog(straight / name).read()) == _without_timing(CsvLog(split / name).read()), name
    # the pass replaced the poor demonstrations; the run keeps only the set its checkpoint names
    sed_rows = CsvLog(split / "sed.csv").read()
    assert {(r["source"], r["adopted"]) for r in sed_rows} == {("kept", "0"), ("fresh", "1")}
    assert sorted(p.name for p in split.glob("demos-v*")) == ["demos-v1"]
    manifest = json.loads((split / "demos-v1" / "manifest.json").read_text())
    assert manifest["passes"] == [{"update": 2, "replaced": [0]}] and manifest["kept"][0]["ret"] > -1e6
    summary = json.loads((split / "summary.json").read_text())
    assert summary["sed_passes"] == 1 and summary["demos_version"] == 1
    assert [r["sed/llm_calls"] for r in CsvLog(split / "metrics.csv").read()] == ["", "0", "", ""]  # tools only


def test_the_run_logs_weights_distances_and_the_imitation_share(grid_demos, tmp_path):
    run = TrainingRun.create(tmp_path / "r", _config(grid_demos, steps=480))
    run.train()
    metrics = CsvLog(tmp_path / "r" / "metrics.csv").read()
    assert len(metrics) == 2
    for row in metrics:
        assert 0 < float(row["loss/imitation_share"]) < 1
        assert float(row["hpo/w_min"]) <= float(row["hpo/w_mean"]) <= float(row["hpo/w_max"]) <= 1.0
        assert float(row["hpo/d_mean"]) > 0 and float(row["loss/imitation"]) > 0
    agents = CsvLog(tmp_path / "r" / "hpo.csv").read()
    assert len(agents) == 2 * 4 and {r["agent"] for r in agents} == set(run.agents)
    assert hpo_curves(tmp_path / "r").is_file()


def test_weight_none_trains_like_ippo_with_an_idle_imitation_term(grid_demos, tmp_path):
    cfg = load_train_config(None, train={"algo": "reled", "scenario": "grid2x2", "workers": 2, "steps": 240,
                                         "eval_every": 5, "eval_episodes": 1},
                            hpo={"demos": str(grid_demos), "expert_weight": "none", "sed_every": 0}, env=SHORT)
    TrainingRun.create(tmp_path / "none", cfg).train()
    row = CsvLog(tmp_path / "none" / "metrics.csv").read()[0]
    assert float(row["loss/imitation"]) == 0.0 and float(row["hpo/w_max"]) == 0.0


def _edited(demos: Path, dest: Path, **changes) -> Path:
    shutil.copytree(demos, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(changes)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


@pytest.mark.parametrize(("changes", "needle"), [
    ({"scenario": "grid3x3"}, "demonstrations for scenario grid3x3, not grid2x2"),
    ({"schema_version": 0}, "schema v0"),
    ({"agents": ["A0", "A1", "B0", "X"]}, "was made for lights"),
    ({"demand": "congested"}, "demand congested, this run uses moderate"),
    ({"timing": {"delta": 5.0}}, "made with timing"),
    ({"n_phases": [2, 2, 2, 3]}, "made with phases per light [2, 2, 2, 3]"),
])
def test_a_store_of_another_scenario_schema_or_setting_is_refused_in_one_line(
        grid_demos, tmp_path, reled, assert_one_line_error, changes, needle):
    store = _edited(grid_demos, tmp_path / "store", **changes)
    proc = reled("train", "--algo", "reled", "--scenario", "grid2x2", "--episode-seconds", "300", "--steps", "240",
                 "--demos", str(store), "--runs-dir", str(tmp_path / "runs"), "--name", "x")
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "runs" / "x").exists()  # nothing written


def test_no_sed_refuses_demonstrations_chosen_with_the_bound(grid_demos, tmp_path, reled, assert_one_line_error):
    proc = reled("train", "--algo", "reled", "--scenario", "grid2x2", "--episode-seconds", "300", "--steps", "240",
                 "--demos", str(grid_demos), "--no-sed", "--runs-dir", str(tmp_path / "runs"), "--name", "x")
    assert_one_line_error(proc, "--no-sed", "--lambda 0")
    assert not (tmp_path / "runs" / "x").exists()


def test_reled_flags_need_algo_reled(tmp_path, reled, assert_one_line_error):
    proc = reled("train", "--scenario", "grid2x2", "--no-gate", "--runs-dir", str(tmp_path))
    assert_one_line_error(proc, "need --algo reled")


@pytest.mark.slow
def test_cli_reled_with_the_llm_expert_then_eval_export_compare(reled, tmp_path):
    """The product path: demonstrations from SED's default mode (the embedded LLM) made by the run itself."""
    runs = tmp_path / "runs"
    proc = reled("train", "--algo", "reled", "--scenario", "grid2x2", "--episode-seconds", "300", "--steps", "480",
                 "--sed-every", "1", "--eval-every", "2", "--eval-episodes", "1", "--runs-dir", str(runs),
                 "--name", "r")
    assert proc.returncode == 0, proc.stderr
    folder = runs / "r"
    manifest = json.loads(next(folder.glob("demos-v*/manifest.json")).read_text())
    assert manifest["llm_totals"]["calls"] > 0 and manifest["model"]["sha256"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["algo"] == "reled" and summary["sed_passes"] == 1 and summary["sed_seconds"] > 0
    assert summary["wall_seconds"] >= summary["sed_seconds"]
    passes = [r for r in CsvLog(folder / "metrics.csv").read() if r["sed/llm_calls"]]
    assert len(passes) == 1 and int(passes[0]["sed/llm_calls"]) > 0  # the pass's own calls, late ones counted
    assert 0 <= int(passes[0]["sed/llm_late"]) <= int(passes[0]["sed/llm_calls"])
    proc = reled("eval", "--scenario", "grid2x2", "--episode-seconds", "300", "--seeds", "1", "--controller", "greedy",
                 "--policy", str(folder / "latest.pt"))
    assert proc.returncode == 0, proc.stderr
    proc = reled("export", "--run", str(folder), "--out", str(tmp_path / "p.onnx"))
    assert proc.returncode == 0 and (tmp_path / "p.onnx").is_file(), proc.stderr
    proc = reled("compare", str(folder), "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json"))
    assert proc.returncode == 0, proc.stderr
    assert [g["setting"] for g in json.loads((tmp_path / "c.json").read_text())] == [
        "reled[sed_every=1] grid2x2/moderate"]  # an ablation or other setting is never averaged with the default
