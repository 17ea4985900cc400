"""The verified expert's demonstrations beside fixed-time, greedy, max-pressure and IPPO, with and without the LLM.

For every scenario × demand × SUMO seed it runs `reled demos generate` (verified mode, the embedded
SmolLM2 model) and its `--no-llm` twin, each with the heuristics on the same seed, and trains one IPPO
policy per scenario (moderate demand, RELED's timing, 576k agent-steps, evaluated greedily on the same
seeds and both demands). Every finished run is a JSON file under docs/results/sed_verified/ and is
skipped when the tool runs again, so it can be stopped and resumed. Then it writes
docs/results/results_sed_verified.md and docs/results/figures/sed_verified.png.

    .venv/bin/python tools/sed_results.py                      # everything, about 75 min on 2 cores
    .venv/bin/python tools/sed_results.py --variants no-llm    # the tools-only twin (about 10 min)
    .venv/bin/python tools/sed_results.py --report-only        # tables and plot from the finished runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from marl_results import ensure_run

from edge_runtime.fileio import atomic_write_text
from trainer.env import EnvConfig
from trainer.evaluate import evaluate
from trainer.marl.checkpoint import actor_from_checkpoint, load_checkpoint
from trainer.marl.policy import PolicyController
from trainer.scenarios import get_scenario
from trainer.sed.generate import GenerateRequest, generate
from trainer.sed.llm import LLMSettings
from trainer.sed.refine import RefineConfig
from trainer.stats import mean_std

SCENARIOS = ("cologne8", "ingolstadt7", "orlando")
DEMANDS = ("moderate", "congested")
VARIANTS = ("no-llm", "llm")
FOLLOW = "follow-llm"  # the LLM's strategy run unverified: what the LLM alone gives (one seed, moderate)
HEURISTICS = ("fixed", "greedy", "max-pressure")
IPPO_STEPS = 576_000
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def run_key(scenario: str, demand: str, seed: int, variant: str) -> str:
    return f"{scenario}-{demand}-s{seed}-{variant}"


def ensure_sed(scenario: str, demand: str, seed: int, variant: str, runs: Path, folder: Path) -> None:
    """One verified demonstration run (skipped when its JSON exists)."""
    target = folder / f"{run_key(scenario, demand, seed, variant)}.json"
    if target.is_file():
        return
    print(f"+ verified {variant}: {scenario} {demand} seed {seed}", flush=True)
    request = GenerateRequest(env=EnvConfig(scenario=scenario, demand=demand), llm=LLMSettings(),
                              refine=RefineConfig(seed=seed), mode="verified", no_llm=variant == "no-llm",
                              follow_llm=variant == FOLLOW)
    start = time.perf_counter()
    manifest = generate(request, runs / run_key(scenario, demand, seed, variant), overwrite=True)
    seconds = time.perf_counter() - start
    demo = manifest["rounds"][0]["candidates"][0]
    summary = {"scenario": scenario, "demand": demand, "seed": seed, "variant": variant,
               "avg_delay": demo["avg_delay"], "kept_replay_delay": manifest["kept_replay"]["avg_delay"],
               "baselines": {name: m["avg_delay"] for name, m in manifest["baselines"].items()},
               "attribution": manifest["attribution"], "llm": manifest["llm_totals"],
               "lookahead": demo["lookahead"], "wall_seconds": seconds,
               "model": {**manifest["model"], "file": Path(manifest["model"]["file"]).name
                         if manifest["model"]["file"] else None}}  # no machine paths in the docs
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(summary, indent=1))
    print(f"  {demo['avg_delay']:.1f} s (greedy {summary['baselines']['greedy']:.1f}, max-pressure "
          f"{summary['baselines']['max-pressure']:.1f}) in {seconds:.0f} s", flush=True)


def ensure_ippo(scenario: str, demands: list[str], seeds: list[int], runs: Path, folder: Path) -> None:
    """Train IPPO on the scenario's moderate demand and evaluate it greedily on every demand and seed."""
    target = folder / f"{scenario}-ippo.json"
    if target.is_file():
        return
    run = runs / f"ippo-{scenario}"
    ensure_run(run, "ippo", scenario, 0, IPPO_STEPS, 2, None)
    actor = actor_from_checkpoint(load_checkpoint(run / "latest.pt"))
    delays: dict[str, dict[str, float]] = {}
    for demand in demands:
        results = evaluate(get_scenario(scenario), [PolicyController(actor, "ippo", deterministic=True)], seeds,
                           EnvConfig(scenario=scenario, demand=demand))
        delays[demand] = {str(r.seed): r.metrics.avg_delay for r in results}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps({"scenario": scenario, "trained_on": "moderate", "steps": IPPO_STEPS,
                                          "delays": delays}, indent=1))


def load(folder: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*-s*-*.json"))]
    ippo = {json.loads(p.read_text())["scenario"]: json.loads(p.read_text()) for p in folder.glob("*-ippo.json")}
    return runs, ippo


def gain(group: list[dict[str, Any]], variant: str) -> str:
    """Summed delay of a variant over its seeds against the better heuristic's on the same seeds."""
    runs = [r for r in group if r["variant"] == variant]
    if not runs:
        return "–"
    best = sum(min(r["baselines"]["greedy"], r["baselines"]["max-pressure"]) for r in runs)
    return f"{100 * (sum(r['avg_delay'] for r in runs) / best - 1):+.1f}%"


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {std:.1f}"


def report(folder: Path, out: Path, figure: Path) -> str:
    runs, ippo = load(folder)
    lines = ["# Verified SED demonstrations: results", "",
             "Generated by `tools/sed_results.py` from the runs in `docs/results/sed_verified/`. Average delay (s)",
             "per vehicle (SUMO tripinfo, as `reled eval`), mean ± std over SUMO seeds; every column on the same",
             "seeds. *verified*: `reled demos generate` (verified mode, 15-min horizon, K = 4, SmolLM2-135M);",
             "*no-LLM*: the same with `--no-llm`. IPPO: trained on the moderate demand (576k agent-steps, RELED's",
             "timing), evaluated greedily; on the congested demand that is a policy meeting traffic it was not",
             "trained on.", "",
             "*LLM unverified*: `--follow-llm`, the LLM's strategy answer run whatever the look-ahead said (seed 0).",
             "",
             "Gains are against the better of greedy and max-pressure on each seed, summed over the seeds.", "",
             "| scenario | demand | seeds | fixed | greedy | max-pressure | IPPO | verified no-LLM | verified | "
             "gain no-LLM | gain verified | LLM wins | LLM unverified (seed 0) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for scenario in SCENARIOS:
        for demand in DEMANDS:
            group = [r for r in runs if r["scenario"] == scenario and r["demand"] == demand]
            if not group:
                continue
            seeds = sorted({r["seed"] for r in group})
            base = {h: [next(r for r in group if r["seed"] == s)["baselines"][h] for s in seeds] for h in HEURISTICS}
            variant = {v: [r["avg_delay"] for r in sorted(group, key=lambda r: r["seed"]) if r["variant"] == v]
                       for v in VARIANTS}
            trained = ippo.get(scenario, {}).get("delays", {}).get(demand, {})
            ippo_delays = [trained[str(s)] for s in seeds if str(s) in trained]
            gains = {v: gain(group, v) for v in VARIANTS}
            wins = [r["attribution"] for r in group if r["variant"] == "llm"]
            llm_share = (f"{sum(a['llm_wins'] for a in wins)}/{sum(a['choices'] for a in wins)}" if wins else "–")
            rows.append((scenario, demand, seeds, base, ippo_delays, variant))
            follow = [r["avg_delay"] for r in group if r["variant"] == FOLLOW]
            lines.append(f"| {scenario} | {demand} | {','.join(map(str, seeds))} | {cell(base['fixed'])} | "
                         f"{cell(base['greedy'])} | {cell(base['max-pressure'])} | {cell(ippo_delays)} | "
                         f"{cell(variant['no-llm'])} | {cell(variant['llm'])} | {gains['no-llm']} | "
                         f"{gains['llm']} | {llm_share} | "
                         f"{cell(follow)} |")
    lines += ["", "Per seed (against the better of greedy and max-pressure on that seed):", "",
              "| scenario | demand | seed | best heuristic | no-LLM | verified | LLM's first choice queued / winners "
              "queued (veh·h) | wall (s) no-LLM / LLM |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (SCENARIOS.index(r["scenario"]), DEMANDS.index(r["demand"]), r["seed"],
                                         r["variant"])):
        if r["variant"] == FOLLOW:
            continue
        if r["variant"] != "llm" and any(o["variant"] == "llm" and o["scenario"] == r["scenario"]
                                         and o["demand"] == r["demand"] and o["seed"] == r["seed"] for o in runs):
            continue
        twin = {o["variant"]: o for o in runs if (o["scenario"], o["demand"], o["seed"]) ==
                (r["scenario"], r["demand"], r["seed"])}
        a = r["attribution"]
        queued = (f"{a['llm_first_queued_s'] / 3600:.1f} / {a['winner_queued_s_same_choices'] / 3600:.1f}"
                  if a["llm_first_compared"] else "–")
        best = min(r["baselines"]["greedy"], r["baselines"]["max-pressure"])
        walls = " / ".join(f"{twin[v]['wall_seconds']:.0f}" if v in twin else "–" for v in VARIANTS)
        delays = " | ".join(f"{twin[v]['avg_delay']:.1f} ({100 * (twin[v]['avg_delay'] / best - 1):+.1f}%)"
                            if v in twin else "–" for v in VARIANTS)
        lines.append(f"| {r['scenario']} | {r['demand']} | {r['seed']} | {best:.1f} | {delays} | {queued} | {walls} |")
    lines += ["", f"![verified demonstrations]({figure.relative_to(out.parent)})", ""]
    plot(rows, figure)
    text = "\n".join(lines)
    atomic_write_text(out, text)
    return text


def plot(rows: list, figure: Path) -> None:
    """Top: average delay of the adaptive controllers (fixed-time is in the table: it would flatten the rest).
    Bottom: each one's delay against the better of greedy and max-pressure on the same seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        return
    names = ["greedy", "max-pressure", "IPPO", "verified no-LLM", "verified"]
    fig, (left, right) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(rows)), 7.5))
    width = 0.16
    x = np.arange(len(rows))
    for i, name in enumerate(names):
        means, errs, gains = [], [], []
        for _scenario, _demand, _seeds, base, ippo_delays, variant in rows:
            values = {"greedy": base["greedy"], "max-pressure": base["max-pressure"], "IPPO": ippo_delays,
                      "verified no-LLM": variant["no-llm"], "verified": variant["llm"]}[name]
            best = [min(g, m) for g, m in zip(base["greedy"], base["max-pressure"], strict=True)]
            means.append(np.mean(values) if values else np.nan)
            errs.append(np.std(values) if len(values) > 1 else 0.0)
            gains.append(100 * (np.sum(values) / np.sum(best[:len(values)]) - 1) if values else np.nan)
        left.bar(x + (i - 2) * width, means, width, yerr=errs, label=name, capsize=2)
        right.bar(x + (i - 2) * width, gains, width, label=name)
    labels = [f"{s}\n{d}" for s, d, *_ in rows]
    left.set_xticks(x, labels, fontsize=8)
    right.set_xticks(x, labels, fontsize=8)
    left.set_ylabel("average delay (s)")
    right.set_ylabel("delay vs the better heuristic (%)")
    right.axhline(0, color="black", linewidth=0.8)
    left.set_title("average delay, mean ± std over seeds")
    right.set_title("against the better of greedy / max-pressure")
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--demands", nargs="+", default=list(DEMANDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-ippo", action="store_true", help="skip training and evaluating IPPO")
    parser.add_argument("--report-only", action="store_true", help="only write the tables and plot")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "out" / "sed_runs",
                        help="where the demonstration stores and IPPO runs go")
    args = parser.parse_args()
    folder = RESULTS / "sed_verified"
    if not args.report_only:
        for variant in args.variants:  # every no-LLM run first: they are quick and carry the main finding
            for demand in args.demands:
                for scenario in args.scenarios:
                    for seed in args.seeds:
                        ensure_sed(scenario, demand, seed, variant, args.runs_dir, folder)
        if "llm" in args.variants:
            for scenario in args.scenarios:
                ensure_sed(scenario, "moderate", 0, FOLLOW, args.runs_dir, folder)
        if not args.no_ippo:
            for scenario in args.scenarios:
                ensure_ippo(scenario, list(args.demands), list(args.seeds), args.runs_dir, folder)
    print(report(folder, RESULTS / "results_sed_verified.md", RESULTS / "figures" / "sed_verified.png"))


if __name__ == "__main__":
    main()
