"""The closed loop (`reled loop`): a HIL fleet's rollouts come back, train the run, and a canary-gated model goes out.

The integration test runs real processes end to end: a tiny grid2x2 IPPO run, its export, `reled-edge fleet up --hil`
(4 daemons, a broker, the collector), `reled loop`; then it checks the row accounting, the policy change, the gate's
verdict and what each device runs afterwards.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trainer.hil.loop import judge_trial

EDGE_DOWN = ("fleet", "down", "--dir")


def test_gate_passes_within_the_margin_only() -> None:
    assert judge_trial(20.0, 20.9, 0, True, 0.05)["passed"]
    refused = judge_trial(20.0, 21.1, 0, True, 0.05)
    assert not refused["passed"] and "21.10 s > 21.00 s" in refused["reasons"][0]
    assert judge_trial(20.0, 19.0, 1, True, 0.05)["reasons"] == ["1 safety violations"]
    assert not judge_trial(20.0, 19.0, 0, False, 0.05)["passed"]  # a device never committed the model
    assert not judge_trial(20.0, float("nan"), 0, True, 0.05)["passed"]  # no vehicle: no evidence


@pytest.fixture
def hil_fleet_of_run(tmp_path: Path, reled: Callable[..., subprocess.CompletedProcess],
                     reled_command: list[str]) -> Iterator[tuple[Path, Path, Path]]:
    """A tiny grid2x2 IPPO run, its export, and a HIL fleet (with collector) running it; the fleet is stopped at
    teardown whatever happens."""
    runs = tmp_path / "runs"
    trained = reled("train", "--scenario", "grid2x2", "--steps", "240", "--episode-seconds", "300",
                    "--eval-every", "1", "--eval-episodes", "1", "--runs-dir", str(runs))
    assert trained.returncode == 0, trained.stderr
    run = runs / "ippo-grid2x2-moderate-s0"
    model = tmp_path / "v0.onnx"
    exported = reled("export", "--run", str(run), "--out", str(model))
    assert exported.returncode == 0, exported.stderr
    fleet = tmp_path / "fleet"
    edge = [reled_command[0], "-m", "edge_runtime"]
    try:
        up = subprocess.run([*edge, "fleet", "up", "--hil", "--model", str(model), "--dir", str(fleet)],
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        yield run, model, fleet
    finally:
        subprocess.run([*edge, *EDGE_DOWN, str(fleet)], capture_output=True, text=True, timeout=120)


def device_state(fleet: Path, device: str) -> dict[str, Any]:
    return json.loads((fleet / "state" / device / "state.json").read_text())


@pytest.mark.slow
def test_one_cycle_counts_every_row_changes_the_policy_and_deploys_through_the_canary(
        hil_fleet_of_run: tuple[Path, Path, Path], reled: Callable[..., subprocess.CompletedProcess],
        tmp_path: Path) -> None:
    run, _model, fleet = hil_fleet_of_run
    loop = tmp_path / "loop"
    # a margin this wide lets any new model through: the test is about the mechanics; the gate's judgement has its own
    proc = reled("loop", "--run", str(run), "--fleet", str(fleet), "--out", str(loop), "--cycles", "1",
                 "--episode-seconds", "300", "--margin", "10", "--canary", "dev2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cycle = json.loads((loop / "loop.json").read_text())["cycles"][0]
    rows = cycle["rows"]
    # 4 devices, 300 s at one decision per 10 s: 120, fewer only if a request was superseded on a loaded machine
    assert 100 <= rows["recorded"] <= 4 * 30, rows
    assert rows["collected"] == rows["recorded"] and rows["lost"] == 0
    assert rows["read"] == rows["collected"] and rows["kept"] + rows["dropped"] == rows["read"]
    assert "duplicate" not in rows["dropped_by_reason"]
    update = cycle["update"]
    assert update["param_distance"] > 0 and 0 <= update["disagreement"] <= 1 and update["holdout"] > 0
    assert cycle["gate"]["passed"] and cycle["confirmation"]["passed"] and cycle["adopted"], cycle
    for hil_run in ("active", "canary_run", "fleet_run"):
        assert cycle[hil_run]["violations"] == 0 and cycle[hil_run]["missing"] == 0, hil_run
    new_version = cycle["policy_version"]
    for device in ("dev0", "dev1", "dev2", "dev3"):  # the canary, then the rest during the confirming run
        state = device_state(fleet, device)
        assert state["state"] == "COMMITTED" and state["active"]["policy_version"] == new_version, state
    # a second invocation finds the cycle done and runs none
    again = reled("loop", "--run", str(run), "--fleet", str(fleet), "--out", str(loop), "--cycles", "1")
    assert again.returncode == 0 and len(json.loads((loop / "loop.json").read_text())["cycles"]) == 1


@pytest.mark.slow
def test_a_refused_canary_is_rolled_back_and_the_fleet_keeps_its_model(
        hil_fleet_of_run: tuple[Path, Path, Path], reled: Callable[..., subprocess.CompletedProcess],
        tmp_path: Path) -> None:
    """A margin of −99 % asks the new model to cut the delay a hundredfold: the canary gate refuses, the canary goes
    back to the model it had, the rest never get the new one, and the next cycle starts from the same run."""
    run, model, fleet = hil_fleet_of_run
    loop = tmp_path / "loop"
    proc = reled("loop", "--run", str(run), "--fleet", str(fleet), "--out", str(loop), "--cycles", "1",
                 "--episode-seconds", "300", "--margin", "-0.99")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "canary gate refused (delay" in proc.stdout
    state = json.loads((loop / "loop.json").read_text())
    cycle = state["cycles"][0]
    assert not cycle["gate"]["passed"] and not cycle["adopted"] and cycle["confirmation"] is None
    assert state["current_run"] == str(run.resolve()) and state["active_model"] == str(model.resolve())
    original = json.loads((fleet / "fleet.json").read_text())["model"]
    from edge_runtime.policy import OnnxPolicy

    version = OnnxPolicy(Path(original)).meta.policy_version
    assert device_state(fleet, "dev0")["state"] == "ROLLED_BACK"
    for device in ("dev0", "dev1", "dev2", "dev3"):
        assert device_state(fleet, device)["active"]["policy_version"] == version, device


def test_loop_refuses_a_fleet_without_collector_or_hil(tmp_path: Path, assert_one_line_error: Any,
                                                       reled: Callable[..., subprocess.CompletedProcess]) -> None:
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    (fleet / "fleet.json").write_text(json.dumps({"format": "reled-fleet/1", "hil": False}))
    proc = reled("loop", "--run", str(tmp_path / "run"), "--fleet", str(fleet), "--out", str(tmp_path / "loop"))
    assert_one_line_error(proc, "not a hardware-in-the-loop fleet")
