"""Smoke test of tools/bench/env_throughput.py: a 300 s cologne8 episode, one repeat.

Why: the benchmark is run by hand and rarely; this keeps its workers (ours, sumo-rl, plain,
replay) and its JSON layout from rotting silently when the environment changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench" / "env_throughput.py"

pytest.importorskip("libsumo")
pytest.importorskip("sumo_rl")


def bench_json(script: Path, out: Path, *args: str) -> dict:
    """Run a benchmark script with ``--json out`` and return what it wrote."""
    subprocess.run([sys.executable, str(script), *args, "--json", str(out)], capture_output=True, text=True,
                   check=True, timeout=300)
    return json.loads(out.read_text())


def test_help() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--episode-seconds" in proc.stdout and "--json" in proc.stdout


def test_short_cologne8_run_writes_positive_figures(tmp_path: Path) -> None:
    data = bench_json(SCRIPT, tmp_path / "bench.json", "--nets", "cologne8", "--episode-seconds", "300",
                      "--repeats", "1", "--deltas", "10", "5", "--plot", str(tmp_path / "scaling.png"))
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert {"config", "results", "comparisons", "targets", "all_passed", "same_traffic_passed", "runs"} <= data.keys()

    systems = {(r["system"], r["delta_s"]) for r in data["results"]}
    assert {("plain", None), ("sumo-binary", None)} <= systems
    for delta in (10.0, 5.0):
        assert {("ours", delta), ("sumo-rl", delta), ("replay", delta), ("ours-fixed", delta)} <= systems
    for row in data["results"]:
        assert row["net"] == "cologne8"
        assert row["wall_s_median"] > 0 and row["cpu_s_median"] > 0 and row["sumo_s_median"] > 0
        assert row["clock"] == "cpu" and row["time_s_median"] == row["cpu_s_median"]
        if row["system"] in ("ours", "ours-fixed", "sumo-rl"):
            assert row["agents"] == 8
            assert row["decisions_per_episode"] == 300 / row["delta_s"]
            assert row["agent_decisions_per_s"] > 0

    assert len(data["comparisons"]) == 2
    for comp in data["comparisons"]:
        assert comp["sumo_rl_over_ours"] > 0
        assert comp["replay_matches_ours"], "replay of our signals must reproduce our traffic"
        assert comp["fixed_matches_plain"], "ours in fixed-time mode must reproduce plain SUMO's traffic"
        for key in ("overhead_vs_plain_pct", "overhead_vs_replay_pct", "fixed_overhead_vs_plain_pct",
                    "ours_python_share_pct"):
            assert isinstance(comp[key], float)
    assert len(data["targets"]) == 6  # per interval: sumo-rl ratio, ours vs replay, ours-fixed vs plain
    assert {t["kind"] for t in data["targets"]} == {"brief", "same traffic"}
    assert all(isinstance(t["passed"], bool) for t in data["targets"])


TRAIN_SCRIPT = SCRIPT.with_name("train_throughput.py")


def test_train_throughput_on_short_episodes_writes_both_worker_counts(tmp_path: Path) -> None:
    data = bench_json(TRAIN_SCRIPT, tmp_path / "train.json", "--scenario", "grid2x2", "--updates", "1",
                      "--episode-seconds", "300")
    assert [(r["algo"], r["workers"], r["overlap"]) for r in data["runs"]] == [
        ("ippo", 1, False), ("ippo", 2, False), ("reled", 2, False), ("ippo", 1, True), ("ippo", 2, True)]
    for run in data["runs"]:
        assert run["agent_steps"] == 2 * 30 * 4  # one timed update: 2 episodes × 30 decisions × 4 lights
        assert run["agent_steps_per_second"] > 0
        assert run["collect_share"] + run["learn_share"] == pytest.approx(1.0)
        assert 0 < run["worker_sim_share"] < 1
    assert data["speedup_2_over_1"] == data["speedups"]["2_over_1"] > 0
    assert all(v > 0 for v in data["speedups"].values())
    reled = data["runs"][2]
    assert reled["hpo_seconds"] > 0  # the DTW distances were computed
    overhead = data["reled_overhead"]
    assert overhead["hpo_seconds_per_update"] == pytest.approx(reled["hpo_seconds"])
    assert overhead["share_of_ippo_update"] == pytest.approx(
        (reled["hpo_seconds"] + reled["learn_seconds"] - data["runs"][1]["learn_seconds"])
        / data["runs"][1]["wall_seconds"])


def test_llm_throughput_bench_reports_both_prefix_settings(tmp_path: Path) -> None:
    script = SCRIPT.parent / "llm_throughput.py"
    data = bench_json(script, tmp_path / "llm.json", "--decisions", "2", "--no-plan")
    on, off = data["step"]
    assert on["prefix_reuse"] and not off["prefix_reuse"]
    for row in (on, off):
        assert row["calls"] == 4 and row["valid"] == 4  # cologne8: 2 subsets x 2 decisions, all valid
        assert row["agent_decisions_s"] > 0 and row["generated_tok_s"] > 0
    assert on["prompt_tokens_evaluated"] < off["prompt_tokens_evaluated"]  # the prefix cache saved work


def test_edge_bench_small_fleet_writes_figures(tmp_path: Path) -> None:
    script = SCRIPT.parent / "edge_bench.py"
    data = bench_json(script, tmp_path / "edge.json", "--daemons", "3", "--decisions", "200", "--batches", "10")
    assert data["deploy"]["committed"] == 3 and data["rollouts"]["acked"] == 10
    lat = data["latency"]
    assert {"onnxruntime fp32 decide", "onnxruntime int8 decide", "torch eager (peer)"} <= lat.keys()
    assert all(0 < v["p50_ms"] <= v["p99_ms"] for v in lat.values())
    assert 0 < data["daemon_rss_mb"]["mean"] <= data["daemon_rss_mb"]["max"]


def test_sed_verified_bench_runs_a_short_tools_only_episode(tmp_path: Path) -> None:
    """tools/bench/sed_verified.py on a 10-minute grid2x2 episode without the model."""
    script = SCRIPT.with_name("sed_verified.py")
    data = bench_json(script, tmp_path / "sed.json", "--scenarios", "grid2x2", "--episode-seconds", "600",
                      "--no-llm", "--workers", "1")
    mechanics = data["mechanics"][0]
    assert mechanics["fresh_exact"] and mechanics["save_s"] > 0 and mechanics["state_bytes"] > 0
    (run,) = data["episodes"]
    assert run["lookahead"]["tasks"] > 0 and run["lookahead"]["failed"] == 0
    assert run["avg_delay"] > 0 and set(run["heuristics"]) == {"fixed", "greedy", "max-pressure"}
