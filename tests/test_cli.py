"""`reled` end to end: tables and reports on real SUMO runs, and one-line errors for bad input."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edge_runtime.errors import RELEDError
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.export import ExportRequest
from trainer.marl.config import TrainConfig
from trainer.scenarios import DecisionTiming, get_scenario
from trainer.scenarios.demand import CONGESTED_SCALE
from trainer.sed.generate import GenerateRequest
from trainer.sed.llm import LLMSettings
from trainer.sed.refine import RefineConfig
from trainer.sed.verified import DEFAULT_LOOKAHEAD_WORKERS


def test_eval_writes_tables_json_and_plot(reled, tmp_path):
    out = tmp_path / "eval.json"
    png = tmp_path / "eval.png"
    proc = reled("eval", "--scenario", "grid2x2", "--controller", "fixed,greedy,max-pressure,random",
                 "--seeds", "2", "--episode-seconds", "600", "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "mean ± std over 2 seed(s)" in proc.stdout
    report = json.loads(out.read_text())
    assert len(report["episodes"]) == 8
    delay = report["summary"]["avg_delay"]
    assert set(delay) == {"fixed", "greedy", "max-pressure", "random"}
    assert delay["max-pressure"]["mean"] < delay["random"]["mean"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scenarios_list_and_show(reled):
    proc = reled("scenarios")
    assert proc.returncode == 0 and "cologne8" in proc.stdout and "grid2x2" in proc.stdout
    alias = reled("scenario", "list")  # the older spelling, kept (hidden from help)
    assert alias.returncode == 0 and alias.stdout == proc.stdout
    proc = reled("scenario", "show", "grid3x3")
    assert proc.returncode == 0, proc.stderr
    assert "controlled lights (9)" in proc.stdout and "congested" in proc.stdout


@pytest.mark.parametrize(("args", "needles"), [
    (["eval", "--scenario", "atlantis"], ["unknown scenario 'atlantis'", "run `reled scenarios` ("]),
    (["eval", "--scenario", "grid2x2", "--demand", "rush"], ["unknown demand regime 'rush'", "moderate"]),
    (["eval", "--scenario", "grid2x2", "--controller", "psychic"], ["unknown controller 'psychic'"]),
    (["eval", "--scenario", "grid2x2", "--backend", "carrier-pigeon"], ["unknown SUMO backend"]),
    (["scenario", "show", "nowhere"], ["unknown scenario"]),
    (["record", "--scenario", "grid2x2", "--out", "never-written", "--controller", "psychic"],
     ["unknown controller 'psychic'"]),
    (["record", "--scenario", "grid2x2", "--out", "never-written", "--light", "Z9", "--seconds", "10"],
     ["grid2x2 has no light 'Z9'", "A0, A1, B0, B1"]),
    (["scenario", "import", "--osm", "/does/not/exist.osm", "--name", "x"], ["exist"]),
])
def test_bad_input_gets_one_line(assert_one_line_error, reled, args, needles):
    assert_one_line_error(reled(*args), *needles)


def test_bad_config_file(assert_one_line_error, reled, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[env]\nrewrd = 'queue'\n")
    assert_one_line_error(reled("eval", "--scenario", "grid2x2", "--config", str(cfg)), "unknown key(s) ['rewrd']")
    cfg.write_text("[timing]\nyellow = 0\n")
    assert_one_line_error(reled("eval", "--scenario", "grid2x2", "--config", str(cfg)), "yellow")


@pytest.fixture
def broken_copy(tmp_path) -> Path:
    """A private copy of grid2x2 to damage."""
    src = get_scenario("grid2x2").folder
    dst = tmp_path / "grid2x2-copy"
    shutil.copytree(src, dst)
    return dst


def test_missing_route_file(assert_one_line_error, reled, broken_copy):
    (broken_copy / "grid2x2.rou.xml").unlink()
    assert_one_line_error(reled("eval", "--scenario", str(broken_copy)), "grid2x2.rou.xml is missing")


def test_corrupt_net_file(assert_one_line_error, reled, broken_copy):
    net = broken_copy / "grid2x2.net.xml"
    net.write_text(net.read_text()[:5000])
    assert_one_line_error(reled("eval", "--scenario", str(broken_copy)), "SUMO could not load")


def test_corrupt_scenario_toml(assert_one_line_error, reled, broken_copy):
    (broken_copy / "scenario.toml").write_text("name = [unclosed")
    assert_one_line_error(reled("eval", "--scenario", str(broken_copy)), "not valid TOML")


def _sumo_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("sumo")]


def test_sumo_dying_mid_episode_is_one_clear_error():
    env = TrafficSignalEnv(scenario="grid2x2", backend="traci")
    try:
        env.reset(seed=0)
        env.step(dict.fromkeys(env.agents, 1))
        (child,) = _sumo_children()
        child.kill()
        child.wait(10)
        with pytest.raises(RELEDError, match="SUMO stopped during the episode"):
            for _ in range(5):
                env.step(dict.fromkeys(env.agents, 0))
    finally:
        env.close()
    assert not _sumo_children()


def test_cli_reports_sumo_killed_mid_run(reled_command, assert_one_line_error, spawn, wait_until):
    proc = spawn([*reled_command, "eval", "--scenario", "cologne8", "--backend", "traci", "--seeds", "1"],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cli = psutil.Process(proc.pid)
    seen: list[int] = []  # the first SUMO only reads the light programs; the second runs the episode

    def episode_sumo() -> psutil.Process | None:
        """The episode's SUMO once the CLI is connected to it."""
        if proc.poll() is not None:
            pytest.fail(f"the CLI exited before its episode's SUMO could be killed: {proc.communicate()[1]}")
        with contextlib.suppress(psutil.Error):
            sumo = [p for p in cli.children(recursive=True) if p.name().startswith("sumo")]
            seen.extend(p.pid for p in sumo if p.pid not in seen)
            episode = [p for p in sumo if len(seen) >= 2 and p.pid == seen[1]]
            if episode and any(c.status == psutil.CONN_ESTABLISHED for c in episode[0].net_connections("tcp")):
                return episode[0]
        return None
    victim = wait_until(episode_sumo, 180, "the CLI to start the episode's SUMO", interval=0.05)
    time.sleep(0.2)  # into the episode
    victim.kill()
    out, err = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line_error(result, "SUMO stopped during the episode")


def test_module_entry_point_exists():
    assert (Path(__file__).parent.parent / "trainer" / "__main__.py").is_file()
    assert os.access(sys.executable, os.X_OK)


def test_gui_without_a_display_is_refused(assert_one_line_error, reled):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    assert_one_line_error(reled("eval", "--scenario", "grid2x2", "--gui", env=env), "needs a display")


def test_eval_keeps_env_settings_from_the_config_file(assert_one_line_error, reled, tmp_path):
    config = tmp_path / "env.toml"
    config.write_text('[env]\nreward = "nonsense"\n')  # a flag default must not silently override the file
    assert_one_line_error(reled("eval", "--scenario", "grid2x2", "--config", str(config)), "unknown reward 'nonsense'")


@pytest.mark.parametrize(("command", "expected"), [
    (["eval"], {"--demand": EnvConfig().demand, "--backend": EnvConfig().backend, "--reward": EnvConfig().reward,
                "--delta": f"{DecisionTiming().delta:g}", "--yellow": f"{DecisionTiming().yellow:g}",
                "--llm-threads": str(LLMSettings().threads), "--llm-model": LLMSettings().model}),
    (["train"], {"--steps": str(TrainConfig().steps), "--algo": TrainConfig().algo,
                 "--episodes-per-update": str(TrainConfig().episodes_per_update),
                 "--backend-workers": TrainConfig().backend_workers, "--ray-address": TrainConfig().ray_address}),
    (["sweep"], {"--out": "sweeps/FILE-NAME", "--ray-address": "no Ray: one step after another here"}),
    (["demos", "generate"], {"--rounds": "1 in verified mode, 3 in plan and step modes",
                             "--tau": f"{RefineConfig().tau:g}", "--mode": GenerateRequest.__dataclass_fields__[
                                 "mode"].default, "--llm-context": str(LLMSettings().context),
                             "--lookahead-workers": str(DEFAULT_LOOKAHEAD_WORKERS)}),
    (["export"], {"--holdout-decisions": str(ExportRequest(Path("x")).holdout_decisions),
                  "--min-int8-agreement": f"{ExportRequest(Path('x')).min_int8_agreement:g}"}),
    (["record"], {"--controller": "max-pressure", "--demand": EnvConfig().demand, "--seed": "0",
                  "--seconds": "the scenario's begin..end", "--light": "every light"}),
    (["scenario", "import"], {"--vehicles-per-hour": "1800", "--congested-scale": f"{CONGESTED_SCALE:g}",
                              "--vclass": "passenger", "--max-speed": "no cap",
                              "--lefthand": "--osm: righthand; --net: the net's own"}),
])
def test_help_shows_each_default_once_from_the_settings(reled, command, expected):
    proc = reled(*command, "--help", env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.lstrip("│ *").startswith("--")]
    lines = {next(word for word in line.split() if word.startswith("--")): line for line in rows}
    assert all(line.count("[default:") <= 1 for line in lines.values()), proc.stdout
    for flag, default in expected.items():
        assert f"[default: {default}]" in lines[flag], lines[flag]
