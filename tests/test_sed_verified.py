"""The verified expert on real SUMO: exact look-ahead, failing candidates, answers it must refuse, the shield."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.shield import SignalTiming
from trainer.env import EnvConfig, Snapshot, TrafficSignalEnv
from trainer.evaluate import controller_env
from trainer.rollout import play_episode
from trainer.scenarios import get_scenario
from trainer.sed.answers import AnswerError, AnswerFormat, StrategyChoice
from trainer.sed.experts import make_expert
from trainer.sed.llm import Completion
from trainer.sed.lookahead import LookaheadPool, LookaheadTask, lookahead_config
from trainer.sed.store import load_demos
from trainer.sed.tools import Candidate, LightControl, ToolController, adaptive, webster_split
from trainer.sed.verified import Evaluated, best


def simulation_state(env: TrafficSignalEnv) -> dict[str, Any]:
    """Everything a look-ahead must get back: time, every vehicle where and how fast, every signal."""
    api = env.api
    vehicles = {v: (api.vehicle.getLaneID(v), api.vehicle.getLanePosition(v), api.vehicle.getSpeed(v),
                    api.vehicle.getRouteIndex(v)) for v in api.vehicle.getIDList()}
    signals = {tls: api.trafficlight.getRedYellowGreenState(tls) for tls in env.possible_agents}
    return {"time": api.simulation.getTime(), "vehicles": vehicles, "signals": signals}


def max_pressure_everywhere(env: TrafficSignalEnv) -> ToolController:
    n = len(env.possible_agents)
    controller = ToolController([adaptive("max-pressure")] * n, [env.scenario.begin] * n)
    controller.attach(env)
    return controller


@pytest.fixture(scope="module")
def saved_cologne8(tmp_path_factory: pytest.TempPathFactory) -> tuple[EnvConfig, Snapshot, dict, list]:
    """cologne8 after 20 minutes of max-pressure: its snapshot, the state at that moment and the rewards of
    the next 10 minutes as the episode really went on."""
    config = lookahead_config(EnvConfig(scenario="cologne8"))
    env = TrafficSignalEnv(config)
    try:
        controller = max_pressure_everywhere(env)
        obs, infos = env.reset(seed=3)
        for _ in range(120):
            obs, _rewards, _term, _trunc, infos = env.step(controller.act(obs, infos))
        before = simulation_state(env)
        snapshot = env.snapshot(tmp_path_factory.mktemp("state") / "state.xml")
        truth = []
        for _ in range(60):
            obs, rewards, _term, _trunc, infos = env.step(controller.act(obs, infos))
            truth.append([rewards[a] for a in env.possible_agents])
        env.restore(snapshot)
        after = simulation_state(env)
    finally:
        env.close()  # libsumo runs one simulation per process: free it for the other tests
    return config, snapshot, {"before": before, "after": after}, truth


def test_restore_gives_back_every_vehicle_and_signal(saved_cologne8):
    _config, snapshot, states, _truth = saved_cologne8
    before, after = states["before"], states["after"]
    assert len(before["vehicles"]) > 20, "the snapshot should hold traffic"
    assert after["time"] == before["time"] == snapshot.time
    assert after["signals"] == before["signals"]
    assert set(after["vehicles"]) == set(before["vehicles"])
    for vehicle, (lane, position, speed, route_index) in before["vehicles"].items():
        # the state file writes decimals (17 places): a speed of 0.0009 s keeps 14 significant digits
        assert after["vehicles"][vehicle] == (lane, pytest.approx(position, abs=1e-9), pytest.approx(speed, abs=1e-9),
                                              route_index)


def test_a_lookahead_in_a_worker_replays_the_episode_exactly(saved_cologne8):
    config, snapshot, _states, truth = saved_cologne8
    n = len(truth[0])
    task = LookaheadTask(snapshot, (adaptive("max-pressure"),) * n, (snapshot.time,) * n, 60)
    with LookaheadPool(config, workers=1) as pool:
        result = pool.run([task, task])
    assert all(r is not None for r in result)
    np.testing.assert_array_equal(result[0].episode.rewards, np.asarray(truth, dtype=np.float32))
    np.testing.assert_array_equal(result[1].episode.rewards, result[0].episode.rewards)
    assert pool.stats.failed == pool.stats.timed_out == 0


def test_snapshots_of_a_scaled_demand_load_late_in_the_episode(tmp_path):
    """A demand --scale above 1 makes SUMO copy vehicles onto their original's route; 45 minutes in, many
    originals have arrived, and the saved state must still carry the routes their copies use."""
    env = TrafficSignalEnv(lookahead_config(EnvConfig(scenario="cologne8", demand="congested")))
    try:
        assert get_scenario("cologne8").demand("congested").scale > 1
        controller = max_pressure_everywhere(env)
        obs, infos = env.reset(seed=0)
        for _ in range(270):
            obs, _rewards, _term, _trunc, infos = env.step(controller.act(obs, infos))
        before = simulation_state(env)
        env.restore(env.snapshot(tmp_path / "late.xml"))
        assert set(simulation_state(env)["vehicles"]) == set(before["vehicles"])
    finally:
        env.close()


def test_failing_and_slow_candidates_are_dropped_and_counted(saved_cologne8, tmp_path, wait_until):
    config, snapshot, _states, _truth = saved_cologne8
    n = len(snapshot.shields)
    good = LookaheadTask(snapshot, (adaptive("greedy"),) * n, (snapshot.time,) * n, 30)
    corrupt = tmp_path / "corrupt.xml"
    corrupt.write_text("<snapshot><vehicle id='x' broken")
    broken = replace(good, snapshot=replace(snapshot, state_file=corrupt))
    with LookaheadPool(config, workers=1, timeout=120) as pool:
        results = pool.run([broken, good])
        assert results[0] is None and results[1] is not None  # SUMO refused the state: dropped, run goes on
        assert pool.stats.failed == 1 and "corrupt" not in str(results[1])

        # a worker that dies during a look-ahead (SUMO crashing takes its process down the same way); it is
        # stopped first so that the task cannot finish before the kill
        pool.wait_ready()
        victim = pool.pids[0]
        os.kill(victim, signal.SIGSTOP)
        outcome: list = []
        thread = threading.Thread(target=lambda: outcome.extend(pool.run([good])))
        thread.start()
        wait_until(pool.busy_pids, 60, "the look-ahead to be handed to the worker")
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=120)
        assert outcome == [None] and pool.stats.failed == 2
        assert victim not in pool.pids  # replaced

        # a look-ahead past its deadline (its worker hangs)
        pool.timeout = 2.0
        pool.wait_ready()
        os.kill(pool.pids[0], signal.SIGSTOP)
        assert pool.run([good]) == [None] and pool.stats.timed_out == 1
        pool.timeout = 120
        assert pool.run([good])[0] is not None  # the pool still works


def test_a_candidate_whose_lookahead_failed_is_never_chosen():
    tool = Candidate("greedy", "tool", (adaptive("greedy"),))
    llm = Candidate("llm-plan", "llm", (adaptive("max-pressure"),))
    keep = Candidate("keep max-pressure", "tool", (adaptive("max-pressure"),), continues=True)
    assert best([Evaluated(keep, -3.0), Evaluated(tool), Evaluated(llm, -2.0)]).candidate is llm
    assert best([Evaluated(keep, -3.0), Evaluated(tool), Evaluated(llm)]).candidate is keep
    assert best([Evaluated(tool), Evaluated(llm)]) is None  # all failed: what runs now continues
    assert best([Evaluated(llm, -2.0), Evaluated(tool, -2.0)]).candidate is tool  # ties go to the tools


STRATEGY = AnswerFormat("strategy", ("I1", "I2"), (4, 2), SignalTiming())


@pytest.mark.parametrize(("answer", "reason"), [
    ({"I1": {"tool": "magic"}, "I2": {"tool": "greedy"}}, "unknown tool"),
    ({"I1": {"tool": "actuated", "min_green": 50, "max_green": 20, "favour": 0}, "I2": {"tool": "greedy"}},
     "min_green <= max_green"),
    ({"I1": {"tool": "actuated", "min_green": 5, "max_green": 20, "favour": 0}, "I2": {"tool": "greedy"}},
     "min_green <= max_green"),
    ({"I1": {"tool": "webster", "cycle": 20, "favour": 0}, "I2": {"tool": "greedy"}}, "cycle must be"),
    ({"I1": {"tool": "webster", "cycle": 90, "favour": 4}, "I2": {"tool": "greedy"}}, "favour must be"),
    ({"I1": {"tool": "greedy", "cycle": 90}, "I2": {"tool": "greedy"}}, "takes exactly"),
    ({"I1": {"tool": "greedy"}}, "expected an object"),
])
def test_strategy_answers_with_unknown_tools_or_impossible_parameters_are_refused(answer, reason):
    with pytest.raises(AnswerError, match=reason):
        STRATEGY.parse(json.dumps(answer))


def test_strategy_grammar_only_admits_known_tools():
    from llama_cpp import LlamaGrammar

    grammar = STRATEGY.gbnf()
    LlamaGrammar.from_string(grammar, verbose=False)  # llama.cpp compiles it
    assert '"{\\"tool\\":\\"max-pressure\\"}"' in grammar and "magic" not in grammar
    assert STRATEGY.parse('{"I1":{"tool":"webster","cycle":90,"favour":1},"I2":{"tool":"program"}}') == {
        "I1": StrategyChoice("webster", cycle=90, favour=1), "I2": StrategyChoice("program")}


class ScriptedBackend:
    """A model that answers from a list (for the counting of one function, ``ask``)."""

    description = "scripted"
    model_sha256 = None

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    def chat(self, messages, answer, **_: Any) -> Completion:
        return Completion(self.answers.pop(0), 10, 5, 0.01)

    def close(self) -> None:
        pass


def test_a_refused_strategy_answer_is_counted_and_proposes_nothing():
    env = TrafficSignalEnv(lookahead_config(EnvConfig(scenario="grid2x2", episode_seconds=300)))
    expert = make_expert(ScriptedBackend(['{"S":1}']), "verified")
    try:
        expert.attach(env)
        env.reset(seed=0)
        expert.reset(0)
        assert expert.ask(0, "which tools?", expert.strategy_formats[0]) is None
        assert (expert.stats.calls, expert.stats.invalid, expert.stats.valid) == (1, 1, 0)
    finally:
        expert.close()
        env.close()


def test_webster_splits_follow_the_critical_flows():
    timing = SignalTiming()
    greens = webster_split(np.array([0.3, 0.1]), 80, timing)
    assert greens[0] > greens[1] and all(timing.min_green <= g <= timing.max_green for g in greens)
    assert webster_split(np.zeros(3), 60, timing) == (15, 15, 15)  # nothing measured: equal splits


def test_every_executed_control_passes_the_shield(signals):
    """A whole verified episode (tools only) as SUMO showed it, second by second, light by light."""
    scenario = get_scenario("grid2x2")
    expert = make_expert(None, "verified", horizon_s=300.0, lookahead_workers=1)
    with controller_env(scenario, expert, EnvConfig(scenario="grid2x2", episode_seconds=1200)) as env:
        timing = env.timing
        shown: dict[str, list[str]] = {}

        original_reset = env.reset

        def reset_and_record(*args: Any, **kwargs: Any):
            out = original_reset(*args, **kwargs)
            shown.update(signals.record(env))
            return out

        env.reset = reset_and_record
        episode = play_episode(env, expert, 0, source="expert")
        stats = expert.lookahead_stats()
    assert len(expert.decisions) == 4 * len(expert.contexts)  # a search every 5 minutes of 20, every subset
    assert stats["tasks"] > 0 and stats["failed"] == stats["timed_out"] == 0
    assert episode.metrics["avg_delay"] > 0
    for inter in env.intersections:
        problems, greens = signals.violations(shown[inter.tls_id], inter.green_states, timing)
        assert greens > 5 and not problems, (inter.tls_id, problems)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``small_disk("16k")``: a folder on a tmpfs of that size, unmounted by the fixture (skips without root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode:
            pytest.skip("mounting a small tmpfs needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def test_a_full_state_disk_falls_back_to_the_current_controls(small_disk):
    """No space for the horizon's saved state: no look-ahead, counted, and the signals keep being driven."""
    full = small_disk("16k")
    with (full / "filler").open("wb") as fh, contextlib.suppress(OSError):
        fh.write(b"x" * 64 * 1024)
    expert = make_expert(None, "verified", horizon_s=300.0, lookahead_workers=1, state_dir=full)
    scenario = get_scenario("grid2x2")
    with controller_env(scenario, expert, EnvConfig(scenario="grid2x2", episode_seconds=900)) as env:
        episode = play_episode(env, expert, 0, source="expert")
        stats = expert.lookahead_stats()
    assert episode.metrics["avg_delay"] > 0 and len(episode.actions) == 90
    assert stats["snapshot_failed"] + stats["failed"] >= 3  # every horizon, counted
    assert all(d["winner"] is None or d["kind"] == "keep" for d in expert.decisions)


def test_demos_generate_no_llm_writes_attribution_and_the_kept_replay(reled, tmp_path):
    out = tmp_path / "demos"
    proc = reled("demos", "generate", "--scenario", "grid2x2", "--no-llm", "--episode-seconds", "900", "--horizon",
                 "300", "--lookahead-workers", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "winner per horizon" in proc.stdout and "replayed as one episode" in proc.stdout
    manifest = load_demos(out, scenario="grid2x2").manifest
    assert manifest["mode"] == "verified" and manifest["no_llm"] and manifest["llm_totals"]["calls"] == 0
    attribution = manifest["attribution"]
    assert attribution["choices"] == 3 * len(manifest["subsets"]) and attribution["llm_wins"] == 0
    decisions = manifest["rounds"][0]["candidates"][0]["decisions"]
    names = {c["name"] for c in decisions[0]["candidates"]}
    assert {"max-pressure", "greedy", "program", "webster", "actuated"} <= names
    assert manifest["kept_replay"]["avg_delay"] == pytest.approx(manifest["rounds"][0]["best_avg_delay"])
    assert set(manifest["baselines"]) == {"fixed", "greedy", "max-pressure"}


def test_demos_generate_refuses_no_llm_outside_verified_mode_and_a_dead_server(assert_one_line_error, reled,
                                                                               tmp_path):
    out = tmp_path / "d"
    assert_one_line_error(reled("demos", "generate", "--scenario", "grid2x2", "--mode", "plan", "--no-llm",
                                "--out", str(out)), "--no-llm needs --mode verified")
    assert_one_line_error(reled("demos", "generate", "--scenario", "grid2x2", "--llm-url", "http://127.0.0.1:9",
                                "--out", str(out)), "not answering")
    assert not out.exists()


def test_a_full_disk_for_the_store_is_one_line_and_leaves_nothing(reled, small_disk):
    disk = small_disk("64k")
    proc = reled("demos", "generate", "--scenario", "grid2x2", "--no-llm", "--episode-seconds", "600",
                 "--horizon", "300", "--lookahead-workers", "1", "--no-baselines", "--out", str(disk / "demos"))
    errors = [line for line in proc.stderr.splitlines() if "error" in line]  # progress lines may precede it
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("error:"), proc.stderr
    assert "No space left" in errors[0] and "nothing was written" in errors[0]
    assert list(disk.iterdir()) == []  # no store, no temporary folder


def test_plan_controls_follow_their_plan_from_when_they_were_set():
    from trainer.sed.answers import TimingPlan

    timing = SignalTiming()
    plan = TimingPlan((1, 0), (20, 30), 0)
    controller = ToolController([LightControl("plan", plan)], [100.0], timing)
    controller.agents = ["A"]
    obs = {"A": {"observation": np.zeros(34, dtype=np.float32), "action_mask": np.ones(8, dtype=np.int8)}}
    assert controller.act(obs, {"A": {"time": 105.0}}) == {"A": 1}
    assert controller.act(obs, {"A": {"time": 130.0}}) == {"A": 0}


@pytest.mark.slow
def test_verified_demonstrations_with_the_embedded_model_record_what_the_llm_proposed(reled, tmp_path):
    """The default mode end to end with SmolLM2: two LLM calls per subset and horizon, their proposals
    evaluated beside the tools, and the run's attribution consistent with the horizons' records."""
    out = tmp_path / "demos"
    proc = reled("demos", "generate", "--scenario", "grid2x2", "--episode-seconds", "600", "--horizon", "300",
                 "--lookahead-workers", "1", "--llm-timeout", "600", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = load_demos(out, scenario="grid2x2").manifest
    assert manifest["mode"] == "verified" and manifest["prompt_version"] == "plan/1+strategy/1"
    assert len(manifest["model"]["sha256"]) == 64 and not manifest["no_llm"]
    llm = manifest["llm_totals"]
    horizons = 2 * len(manifest["subsets"])
    assert llm["calls"] == 2 * horizons and llm["late"] == llm["failed"] == 0
    decisions = manifest["rounds"][0]["candidates"][0]["decisions"]
    proposed = [c for d in decisions for c in d["candidates"] if c["source"] == "llm"]
    assert len(proposed) == llm["valid"]  # every valid answer became a candidate, every one evaluated
    assert all(c["score"] is not None for c in proposed)
    attribution = manifest["attribution"]
    assert attribution["choices"] == horizons
    assert attribution["llm_wins"] == sum(d["source"] == "llm" for d in decisions)
    assert attribution["llm_first_compared"] == sum(d["llm_first_queued_s"] is not None for d in decisions)


def test_follow_llm_runs_the_llms_strategy_even_when_the_lookahead_prefers_a_tool():
    """--follow-llm measures what the LLM alone would give: its strategy runs, the pool is still recorded."""
    scenario = get_scenario("grid2x2")
    env_config = EnvConfig(scenario="grid2x2", episode_seconds=600)
    with controller_env(scenario, make_expert(None, "verified"), env_config) as env:
        labels = [f"I{k + 1}" for k in range(len(env.possible_agents))]
    plan = json.dumps({label: {"order": [0, 1], "green": [60, 10], "offset": 0} for label in labels})
    strategy = json.dumps({label: {"tool": "program"} for label in labels})
    expert = make_expert(ScriptedBackend([plan, strategy] * 2), "verified", horizon_s=300.0, lookahead_workers=1,
                         follow_llm=True)
    with controller_env(scenario, expert, env_config) as env:
        assert len(expert.contexts) == 1  # grid2x2: one subset of four lights
        play_episode(env, expert, 0, source="expert")
    assert [d["winner"] for d in expert.decisions] == ["llm-strategy", "llm-strategy"]
    first = expert.decisions[0]
    assert {"max-pressure", "greedy", "llm-plan"} <= {c["name"] for c in first["candidates"]}
    assert first["llm_first"] == "llm-strategy" and first["llm_first_queued_s"] == first["winner_queued_s"]
    assert all(c.origin == "llm:program" for c in expert.executor.controls)
