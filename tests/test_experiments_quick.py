"""`make experiments QUICK=1` end to end: every experiment type on tiny scenarios, then the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "experiments"


@pytest.mark.slow
def test_the_quick_profile_runs_every_experiment_and_reports_it(tmp_path):
    out = tmp_path / "quick"
    subprocess.run([sys.executable, str(TOOLS / "run.py"), "--quick", "--out", str(out)], check=True, timeout=1500)
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["ippo-cologne1-moderate-s0", "ippo-grid2x2-moderate-s0", "mappo-grid2x2-moderate-s0",
                    "reled-cologne1-moderate-s0", "reled-grid2x2-moderate-s0", "reled-no-gate-grid2x2-moderate-s0"]
    for run in runs:
        assert json.loads((out / "runs" / run / "summary.json").read_text())["finished"], run
    assert (out / "runs" / "reled-grid2x2-moderate-s0" / "sed.csv").is_file()  # a SED pass ran
    zero_shot = sorted(p.name for p in (out / "zero_shot").iterdir())
    assert "reled-grid2x2-moderate-s0--cologne1-moderate.json" in zero_shot
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(entry["rc"] == 0 and entry["machine"]["cores"] for entry in log)
    # a second call finds everything done and runs nothing
    again = subprocess.run([sys.executable, str(TOOLS / "run.py"), "--quick", "--out", str(out)], check=True,
                           capture_output=True, text=True, timeout=300)
    assert "reled train" not in again.stdout and "reled eval" not in again.stdout
    subprocess.run([sys.executable, str(TOOLS / "report.py"), "--quick", "--out", str(out)], check=True, timeout=300)
    page = (out / "reled.md").read_text()
    for heading in ("(a) Sample efficiency", "(c) Scalability", "(d) Generalization", "(e) Ablations"):
        assert heading in page, heading
    assert "| grid2x2 | moderate | reled | 1 |" in page
    assert (out / "figures" / "reled_a_grid2x2_moderate.png").is_file()
    data = json.loads((out / "reled.json").read_text())
    assert data["missing"] == [] and set(data["efficiency"]["grid2x2/moderate"]) >= {"ippo", "mappo", "reled"}
