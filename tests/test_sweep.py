"""`reled sweep` on this machine without Ray: every combination trained, finished steps skipped, bad files refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.sweep.runs import Run
from trainer.sweep.spec import load_sweep
from trainer.sweep.steps import Planner

ONE_RUN = """[sweep]
algos = ["ippo"]
scenarios = ["grid2x2"]
seeds = [1]
steps = 240
workers = 1
eval_every = 1
eval_episodes = 1
heuristics_episodes = 0

[env]
episode_seconds = 300
"""


@pytest.mark.slow
def test_a_sweep_runs_here_then_skips_what_is_done(reled, tmp_path):
    sweep = tmp_path / "one.toml"
    sweep.write_text(ONE_RUN)
    proc = reled("sweep", str(sweep), cwd=tmp_path)  # default --out: sweeps/one
    out = tmp_path / "sweeps" / "one"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == ["ippo-grid2x2-moderate-s1"]
    assert log[0]["rc"] == 0 and log[0]["machine"]["cores"] and "node" not in log[0]
    # the file's [env] reached the run
    assert "episode_seconds = 300.0" in (out / "runs" / "ippo-grid2x2-moderate-s1" / "config.toml").read_text()
    table = json.loads((out / "compare.json").read_text())
    assert [(row["setting"], row["seeds"]) for row in table] == [("ippo grid2x2/moderate", [1])]
    assert "ippo grid2x2/moderate" in proc.stdout and (out / "compare.png").is_file()
    again = reled("sweep", str(sweep), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reled train" not in again.stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == len(log)


def test_a_sweep_file_lists_every_combination(tmp_path):
    sweep = tmp_path / "grid.toml"
    sweep.write_text("[sweep]\nalgos = ['ippo', 'reled']\ndemands = ['moderate', 'congested']\nseeds = [0, 1]\n"
                     "reled_flags = ['--no-sed-llm']\n")
    runs = load_sweep(sweep).spec.runs()
    assert [r.key for r in runs[:4]] == ["ippo-grid2x2-moderate-s0", "reled-grid2x2-moderate-s0",
                                         "ippo-grid2x2-moderate-s1", "reled-grid2x2-moderate-s1"]
    assert len(runs) == 8 and {r.flags for r in runs if r.algo == "reled"} == {("--no-sed-llm",)}
    assert {r.flags for r in runs if r.algo == "ippo"} == {()}
    example = load_sweep(Path(__file__).parents[1] / "configs" / "sweep_example.toml")  # the one the docs show
    assert len(example.spec.runs()) == 18 and example.env == {"episode_seconds": 1800}


@pytest.mark.parametrize(("text", "needles"), [
    ("[sweep]\nalgos = ['qmix']\n", ["algos ['qmix'] unknown"]),
    ("[sweep]\nseeds = []\n", ["[sweep] seeds is empty"]),
    ("[sweep]\nworkers = 0\n", ["[sweep] workers must be at least 1"]),
    ("[sweep]\nsteps = 1.5\n", ["[sweep] steps = 1.5 should be int"]),
    ("[sweep]\nlearning_rate = 1\n", ["unknown key(s) ['learning_rate'] in [sweep]"]),
    ("[sweep]\nscenarios = ['atlantis']\n", ["unknown scenario 'atlantis'"]),
    ("[env]\ngui = true\n", ["unknown key(s) ['gui'] in [env]"]),
    ("[ppo]\nclip = 0.1\n", ["unknown section(s) ['ppo']"]),
])
def test_a_bad_sweep_file_is_one_clear_error_and_writes_nothing(assert_one_line_error, reled, tmp_path, text,
                                                               needles):
    sweep = tmp_path / "bad.toml"
    sweep.write_text(text)
    out = tmp_path / "out"
    assert_one_line_error(reled("sweep", str(sweep), "--out", str(out)), str(sweep), *needles)
    assert not out.exists()


def test_a_stopped_training_step_resumes_and_a_finished_one_is_done(tmp_path):
    planner = Planner(tmp_path, workers=2, eval_every=1, eval_episodes=1, sed_every=1, heuristics_episodes=0,
                      root=tmp_path)
    run = Run("sweep", "grid2x2", "moderate", "ippo", 0, 240)
    planner.add_run(run)
    step = planner.steps[run.key]
    assert step.arguments()[:2] == ("train", "--algo") and not step.done()
    folder = tmp_path / "runs" / run.key
    folder.mkdir(parents=True)
    (folder / "latest.pt").write_bytes(b"")
    assert step.arguments() == ("train", "--resume", str(folder), "--workers", "2")
    (folder / "summary.json").write_text(json.dumps({"finished": False}))
    assert not step.done()
    (folder / "summary.json").write_text(json.dumps({"finished": True}))
    assert step.done()


def test_a_plan_shares_a_step_between_runs_and_orders_needs_first(tmp_path):
    planner = Planner(tmp_path, workers=1, eval_every=1, eval_episodes=1, sed_every=1, heuristics_episodes=1,
                      root=tmp_path, imports={"city": ["--osm", "city.osm"]})
    for variant, flags in (("", ("--no-sed-llm",)), ("no-gate", ("--no-gate", "--no-sed-llm"))):
        planner.add_run(Run("e", "city", "moderate", "reled", 0, 240, variant=variant, flags=flags))
    keys = list(planner.steps)
    assert keys == ["heuristics-city-moderate", "demos-city-moderate-s0-no-llm", "reled-city-moderate-s0",
                    "reled-no-gate-city-moderate-s0"]  # one reference line and one store for both runs
    assert planner.steps["reled-no-gate-city-moderate-s0"].needs == ("demos-city-moderate-s0-no-llm",)
    assert all(step.setup[0][0] == "import-city" and "--if-missing" in step.setup[0][1]
               for step in planner.steps.values())  # each machine imports the scenario before its step
    assert Path(planner.steps["demos-city-moderate-s0-no-llm"].result).name == "manifest.json"


def test_a_variant_with_its_own_sed_schedule_replaces_the_profiles(tmp_path):
    planner = Planner(tmp_path, workers=1, eval_every=1, eval_episodes=1, sed_every=25, heuristics_episodes=1,
                      root=tmp_path, imports={})
    planner.add_run(Run("e", "grid2x2", "moderate", "reled", 0, 240))
    planner.add_run(Run("e", "grid2x2", "moderate", "reled", 0, 240, variant="no-pass", flags=("--sed-every", "0")))
    default, no_pass = (planner.steps[k].arguments() for k in ("reled-grid2x2-moderate-s0",
                                                               "reled-no-pass-grid2x2-moderate-s0"))
    assert default[default.index("--sed-every") + 1] == "25" and default.count("--sed-every") == 1
    assert no_pass[no_pass.index("--sed-every") + 1] == "0" and no_pass.count("--sed-every") == 1
