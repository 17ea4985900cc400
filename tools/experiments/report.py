"""docs/results/reled.md from the finished experiment runs: figures (a)-(e), tables, targets.

Reads OUT/runs/*/ (summary.json, evaluations.csv, metrics.csv), OUT/heuristics/*.json and
OUT/zero_shot/*.json as tools/experiments/run.py leaves them; whatever has not finished is listed as
missing, never guessed. Writes the page, its PNG figures and a JSON of every number.

    .venv/bin/python tools/experiments/report.py                    # out/experiments -> docs/results/reled.md
    .venv/bin/python tools/experiments/report.py --quick            # out/experiments-quick -> out/.../reled.md
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from plan import ABLATIONS, PROFILES, SEEDS, Run

ROOT = Path(__file__).resolve().parents[2]
LAST_N, STABILITY_N = 10, 20
REACH_WINDOW = 3  # periodic evaluations averaged before a threshold counts as reached
FINDINGS = "findings.md"  # what the figures say, in words; placed under the page's head
PUBLISHED_RESCO_BEST = {"cologne8": 21.6, "ingolstadt7": 31.2}  # best published (MPLight/IDQN...), REFERENCE.md
COLORS = {"ippo": "#4C72B0", "mappo": "#55A868", "reled": "#C44E52"}


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@dataclass
class Curve:
    """One run's periodic greedy evaluations (mean per evaluation) and its training reward per update."""

    key: str
    steps: np.ndarray
    wall: np.ndarray
    delay: np.ndarray
    travel: np.ndarray
    reward_steps: np.ndarray
    reward_wall: np.ndarray
    reward: np.ndarray
    summary: dict[str, Any]
    eval_delays: list[float]  # every periodic evaluation's mean, in order (stability)
    final_travel: float  # the final policy's travel time (its last-10 evaluation episodes)

    @property
    def final(self) -> float:
        return float(self.summary["last10_delay"])


def load_curve(folder: Path) -> Curve | None:
    summary_path = folder / "summary.json"
    if not summary_path.is_file() or not json.loads(summary_path.read_text()).get("finished"):
        return None
    summary = json.loads(summary_path.read_text())
    every = read_csv(folder / "evaluations.csv")
    final = [r for r in every if r["final"] == "1"]
    periodic = [r for r in every if r["final"] == "0"]
    # the curve: every periodic evaluation, then the final policy's (its last point, at the run's end)
    rows = [[r for r in periodic if r["update"] == u] for u in dict.fromkeys(r["update"] for r in periodic)]
    rows.append(final)
    metrics = read_csv(folder / "metrics.csv")

    def mean(group: list[dict[str, str]], key: str) -> float:
        return float(np.mean([float(r[key]) for r in group]))

    return Curve(folder.name, np.array([float(g[0]["agent_steps"]) for g in rows]),
                 np.array([float(g[0]["wall_seconds"]) for g in rows]), np.array([mean(g, "avg_delay") for g in rows]),
                 np.array([mean(g, "avg_travel_time") for g in rows]),
                 np.array([float(m["agent_steps"]) for m in metrics]),
                 np.array([float(m["wall_seconds"]) for m in metrics]),
                 np.array([float(m["train_reward"]) for m in metrics]),
                 summary, [mean(g, "avg_delay") for g in rows[:-1]], mean(final, "avg_travel_time"))


def mean_curve(curves: list[Curve], attr: str, x: str = "steps") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean ± std over seeds on the grid of the shortest run (runs of one setting share their x points)."""
    xs = [getattr(c, x if attr != "reward" else f"reward_{x}") for c in curves]
    grid = np.linspace(max(v[0] for v in xs), min(v[-1] for v in xs), 50)
    values = np.stack([np.interp(grid, xv, getattr(c, attr)) for xv, c in zip(xs, curves, strict=True)])
    return grid, values.mean(0), values.std(0)


def final_on_seed(folder: Path, seed: int) -> float | None:
    """A finished run's final-policy delay on one SUMO seed of its final evaluation (None: not there)."""
    if load_curve(folder) is None:
        return None
    delays = [float(r["avg_delay"]) for r in read_csv(folder / "evaluations.csv")
              if r["final"] == "1" and int(r["seed"]) == seed]
    return delays[0] if delays else None


def reproduce(*selection: str) -> str:
    """The line under a figure or table: the runner's command for just that part, then the report."""
    return (f"Reproduce: `.venv/bin/python tools/experiments/run.py {' '.join(selection)} && "
            ".venv/bin/python tools/experiments/report.py`")


def agent_count(folder: Path) -> int:
    """The lights a run controlled (from its checkpoint): the x of the scalability figure."""
    import torch  # only here: the rest of the report needs no torch

    return len(torch.load(folder / "latest.pt", map_location="cpu", weights_only=True)["agents"])


def periodic_mean(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray]:
    """The seed-mean of the periodic evaluations (the final point left out): evaluation k of every run, of
    every algorithm, plays SUMO seed 1000 + k, so curves of one setting are on the same traffic."""
    n = min(len(c.delay) for c in curves) - 1
    return curves[0].steps[:n], np.mean([c.delay[:n] for c in curves], axis=0)


def periodic_level(curves: list[Curve]) -> float | None:
    """Where training ended on the periodic curve: the seed-mean of the last REACH_WINDOW evaluations
    (None: a run too short to have them)."""
    level = periodic_mean(curves)[1][-REACH_WINDOW:]
    return float(level.mean()) if len(level) == REACH_WINDOW else None


def steps_to(curves: list[Curve], threshold: float) -> float | None:
    """Agent-steps at which the seed-mean periodic curve, averaged over REACH_WINDOW consecutive evaluations
    (so one lucky episode does not count), first reaches ``threshold`` (None: never)."""
    steps, mean = periodic_mean(curves)
    if len(mean) < REACH_WINDOW:
        return None
    rolling = np.convolve(mean, np.ones(REACH_WINDOW) / REACH_WINDOW, mode="valid")
    hit = np.flatnonzero(rolling <= threshold)
    return float(steps[hit[0] + REACH_WINDOW - 1]) if len(hit) else None


class Report:
    def __init__(self, out: Path, page: Path, profile_name: str):
        self.out, self.page, self.figures = out, page, page.parent / "figures"
        self.profile = PROFILES[profile_name]()
        self.lines: list[str] = []
        self.data: dict[str, Any] = {}
        self.figures.mkdir(parents=True, exist_ok=True)

    # -- inputs --------------------------------------------------------------------------------
    def curves(self, runs: list[Run]) -> list[Curve]:
        found = []
        for run in runs:
            curve = load_curve(self.out / "runs" / run.key)
            if curve is not None:
                found.append(curve)
        return found

    def heuristics(self, scenario: str, demand: str, resco: bool = False) -> dict[str, dict[str, float]]:
        path = self.out / "heuristics" / f"{scenario}{'-resco' if resco else ''}-{demand}.json"
        if not path.is_file():
            return {}
        summary = json.loads(path.read_text())["summary"]
        return {c: {"delay": summary["avg_delay"][c]["mean"], "travel": summary["avg_travel_time"][c]["mean"]}
                for c in summary["avg_delay"]}

    def runs(self, experiment: str, **match: Any) -> list[Run]:
        return [r for r in self.profile.runs if r.experiment == experiment
                and all(getattr(r, k) == v for k, v in match.items())]

    # -- (a) and (b) ---------------------------------------------------------------------------
    def efficiency(self) -> None:
        self.lines += ["## (a) Sample efficiency and (b) wall-clock efficiency", "",
                       "Greedy evaluation episodes during training (mean ± std over seeds), RELED's timing. "
                       "RELED's wall-clock starts with the time its demonstrations took (SED with the embedded "
                       "SmolLM2 model) and includes every SED pass during training.", "",
                       f"*Steps to IPPO's final*: the first point where the algorithm's periodic evaluations, "
                       f"averaged over seeds and {REACH_WINDOW} consecutive evaluations, are at or below IPPO's "
                       f"over its last {REACH_WINDOW}, and its share of IPPO's budget. Periodic evaluation k plays "
                       "SUMO seed 1000 + k for every algorithm and seed, so both sides are on the same traffic; the "
                       "final figures play seeds 0-9 (as the heuristics). *Var. last evals*: the variance of the "
                       f"last {STABILITY_N} periodic evaluations, or of all of them where a run has fewer "
                       f"({self.short_runs()}); it includes the end of the learning phase.", "",
                       self.llm_deadlines(), "",
                       "| scenario | demand | algo | seeds | last-10 delay (s) | travel time (s) | var. last evals "
                       "| steps to IPPO's final (share of its budget) | wall-clock (min), SED part |",
                       "|---|---|---|---|---|---|---|---|---|"]
        for scenario in dict.fromkeys(r.scenario for r in self.runs("a")):
            for demand in dict.fromkeys(r.demand for r in self.runs("a", scenario=scenario)):
                groups = {algo: self.curves(self.runs("a", scenario=scenario, demand=demand, algo=algo))
                          for algo in dict.fromkeys(r.algo for r in self.runs("a"))}
                groups = {a: c for a, c in groups.items() if c}
                if not groups:
                    continue
                refs = self.heuristics(scenario, demand)
                self.efficiency_rows(scenario, demand, groups, refs)
                self.efficiency_figure(scenario, demand, groups, refs)
        self.lines.append("")

    def short_runs(self) -> str:
        """The scenarios whose runs have fewer than STABILITY_N periodic evaluations, with their count."""
        counts = {}
        for run in self.runs("a"):
            curve = load_curve(self.out / "runs" / run.key)
            if curve is not None and len(curve.eval_delays) < STABILITY_N:
                counts[run.scenario] = min(counts.get(run.scenario, STABILITY_N), len(curve.eval_delays))
        return ", ".join(f"{name} {n} per run" for name, n in counts.items()) or "none here"

    def llm_deadlines(self) -> str:
        """How many of the embedded model's calls missed their deadline: in the demonstration stores made
        before training, and in the SED passes between updates (runs whose metrics.csv records them)."""
        stores = {m.parent.name: json.loads(m.read_text()).get("llm_totals", {})
                  for m in sorted((self.out / "demos").glob("*/manifest.json"))}
        late = [f"{name} {t['late']} of {t['calls']}" for name, t in stores.items() if t.get("late")]
        stores = [t for t in stores.values() if t.get("calls")]
        passes = [r for m in (self.out / "runs").glob("*/metrics.csv") for r in read_csv(m) if r.get("sed/llm_calls")]
        text = (f"The embedded model's calls: {len(stores)} demonstration stores made "
                f"{sum(t['calls'] for t in stores):,} calls, {sum(t['late'] for t in stores)} of them past the "
                "30 s deadline" + (f" ({', '.join(late)})" if late else ""))
        calls = sum(int(r["sed/llm_calls"]) for r in passes)
        if calls:
            text += (f"; {len(passes)} SED passes between updates made {calls:,}, "
                     f"{sum(int(r['sed/llm_late']) for r in passes)} late")
        self.data["llm_deadlines"] = text
        return text + "."

    def efficiency_rows(self, scenario: str, demand: str, groups: dict[str, list[Curve]],
                        refs: dict[str, dict[str, float]]) -> None:
        ippo_final = periodic_level(groups["ippo"]) if "ippo" in groups else None
        record = self.data.setdefault("efficiency", {}).setdefault(f"{scenario}/{demand}", {})
        record["heuristics"] = refs
        for algo, curves in groups.items():
            finals = [c.final for c in curves]
            spreads = [np.var(c.eval_delays[-STABILITY_N:]) for c in curves if c.eval_delays]
            stability = float(np.mean(spreads)) if spreads else float("nan")  # nan: no periodic evaluation
            reach = steps_to(curves, ippo_final) if ippo_final is not None else None
            travel = float(np.mean([c.final_travel for c in curves]))
            wall = float(np.mean([c.summary["wall_seconds"] for c in curves])) / 60
            sed = float(np.mean([c.summary.get("sed_seconds", 0.0) for c in curves])) / 60
            budget = float(curves[0].summary["agent_steps"]) if algo == "ippo" else None
            record[algo] = {"seeds": [c.summary["seed"] for c in curves], "last10_mean": float(np.mean(finals)),
                            "last10_std": float(np.std(finals)), "stability_var": stability,
                            "steps_to_ippo_final": reach, "budget": float(curves[0].summary["agent_steps"]),
                            "wall_minutes": wall, "sed_minutes": sed}
            if budget:
                record["ippo_budget"] = budget
            share = "" if reach is None or not record.get("ippo_budget") else \
                f" ({reach / record['ippo_budget']:.0%})"
            reach_text = "not reached" if reach is None else f"{reach:,.0f}{share}"
            sed_text = f", {sed:.1f}" if sed else ""
            spread_text = f"{stability:.2f}" if np.isfinite(stability) else "–"
            self.lines.append(f"| {scenario} | {demand} | {algo} | {len(curves)} | {np.mean(finals):.1f} ± "
                              f"{np.std(finals):.1f} | {travel:.1f} | {spread_text} | {reach_text} | "
                              f"{wall:.1f}{sed_text} |")
        for name in ("fixed", "greedy", "max-pressure"):
            if name in refs:
                self.lines.append(f"| {scenario} | {demand} | {name} | – | {refs[name]['delay']:.1f} | "
                                  f"{refs[name]['travel']:.1f} | – | – | – |")

    def efficiency_figure(self, scenario: str, demand: str, groups: dict[str, list[Curve]],
                          refs: dict[str, dict[str, float]]) -> None:
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))
        for row, x in enumerate(("steps", "wall")):
            for col, (attr, label) in enumerate((("delay", "evaluation average delay (s)"),
                                                 ("travel", "evaluation average travel time (s)"),
                                                 ("reward", "training episode reward per agent"))):
                ax = axes[row, col]
                for algo, curves in groups.items():
                    if x == "steps":  # runs of one setting share their agent-steps: mean ± std
                        grid, mean, std = mean_curve(curves, attr, x)
                        ax.plot(grid, mean, color=COLORS.get(algo), label=f"{algo} (n={len(curves)})")
                        ax.fill_between(grid, mean - std, mean + std, color=COLORS.get(algo), alpha=0.2)
                        continue
                    for k, c in enumerate(curves):  # wall-clock differs per run: every seed its own line
                        wall = c.reward_wall if attr == "reward" else c.wall
                        ax.plot(wall / 60, getattr(c, attr), color=COLORS.get(algo), lw=1, alpha=0.8,
                                label=f"{algo} (each seed)" if k == 0 else None)
                if attr != "reward":
                    key = "delay" if attr == "delay" else "travel"
                    for name, style in (("fixed", ":"), ("max-pressure", "--")):
                        if name in refs:
                            ax.axhline(refs[name][key], ls=style, color="grey", lw=1,
                                       label=f"{name} ({refs[name][key]:.1f} s)")
                    if "max-pressure" in refs:  # the first, much worse evaluations run off the top
                        ax.set_ylim(0.6 * refs["max-pressure"][key], 1.8 * refs["max-pressure"][key])
                ax.set_xlabel("agent-steps" if x == "steps" else "wall-clock (min, SED included)")
                ax.set_ylabel(label)
        axes[0, 0].legend(fontsize=8)
        axes[1, 0].legend(fontsize=8)
        fig.suptitle(f"{scenario} / {demand}: RELED vs IPPO vs MAPPO (mean ± std over seeds)")
        name = f"reled_a_{scenario}_{demand}.png"
        fig.tight_layout()
        fig.savefig(self.figures / name, dpi=110)
        plt.close(fig)
        self.lines += ["", f"![{scenario} {demand}](figures/{name})", "",
                       reproduce("--only a", f"--scenarios {scenario}", f"--demands {demand}"), ""]

    def targets(self) -> None:
        """The issue's targets per scenario and demand, each MET or NOT MET with its figures."""
        rows = []
        for setting, record in self.data.get("efficiency", {}).items():
            reled, ippo = record.get("reled"), record.get("ippo")
            if not reled or not ippo:
                continue
            best = min((record["heuristics"][h]["delay"] for h in ("greedy", "max-pressure")
                        if h in record["heuristics"]), default=None)
            reach, budget = reled["steps_to_ippo_final"], record.get("ippo_budget")
            checks = [
                ("reaches IPPO's final delay in ≤ 50% of IPPO's agent-steps",
                 reach is not None and budget is not None and reach <= 0.5 * budget,
                 "not reached" if reach is None else f"{reach:,.0f} of {budget:,.0f} ({reach / budget:.0%})"),
                ("final delay no worse than IPPO's", reled["last10_mean"] <= ippo["last10_mean"],
                 f"{reled['last10_mean']:.2f} vs {ippo['last10_mean']:.2f} s"),
            ]
            if best is not None:
                checks.append(("final delay ≥ 5% below the best heuristic", reled["last10_mean"] <= 0.95 * best,
                               f"{reled['last10_mean']:.2f} vs {best:.2f} s (≤ {0.95 * best:.2f})"))
            if np.isfinite(reled["stability_var"]) and np.isfinite(ippo["stability_var"]):
                checks.append(("steadier than IPPO (variance of the last periodic evaluations)",
                               reled["stability_var"] <= ippo["stability_var"],
                               f"{reled['stability_var']:.2f} vs {ippo['stability_var']:.2f} s²"))
            rows += [f"| {setting} | {what} | {'MET' if ok else 'NOT MET'} | {figures} |"
                     for what, ok, figures in checks]
            record["targets"] = {what: {"met": ok, "figures": figures} for what, ok, figures in checks}
        if rows:
            self.lines += ["## Targets (mean of the seeds; the final policy = its last-10 evaluation mean)", "",
                           "| setting | target | verdict | figures |", "|---|---|---|---|", *rows, ""]

    # -- the expert against the policy that imitates it ----------------------------------------
    def expert_reach(self) -> None:
        """Each RELED run's final policy on its demonstrations' own traffic (their SUMO seed, one of the final
        evaluation's 0-9) against the expert's kept demonstrations replayed there, IPPO and greedy."""
        rows, record = [], {}
        reled_runs = [r for r in self.profile.runs if r.algo == "reled" and not r.variant and r.experiment != "c"]
        for setting in dict.fromkeys((r.scenario, r.demand, r.timing) for r in reled_runs):
            found: dict[str, list[float]] = {"expert": [], "reled": [], "ippo": [], "greedy": []}
            for run in [r for r in reled_runs if (r.scenario, r.demand, r.timing) == setting]:
                manifest_path = self.out / "demos" / run.demos_key / "manifest.json"
                ippo = Run(run.experiment, run.scenario, run.demand, "ippo", run.seed, run.steps, timing=run.timing)
                policy, rival = (final_on_seed(self.out / "runs" / r.key, run.seed) for r in (run, ippo))
                if not manifest_path.is_file() or policy is None or rival is None:
                    continue
                manifest = json.loads(manifest_path.read_text())
                if "kept_replay" not in manifest:
                    continue
                for name, value in (("expert", manifest["kept_replay"]["avg_delay"]), ("reled", policy),
                                    ("ippo", rival), ("greedy", manifest["baselines"]["greedy"]["avg_delay"])):
                    found[name].append(value)
            if not found["expert"]:
                continue
            label = f"{setting[0]}{' (RESCO timing)' if setting[2] else ''}/{setting[1]}"
            means = {k: float(np.mean(v)) for k, v in found.items()}
            record[label] = {**means, "seeds": len(found["expert"])}
            rows.append(f"| {label} | {len(found['expert'])} | {means['expert']:.1f} | {means['reled']:.1f} | "
                        f"{means['ippo']:.1f} | {means['greedy']:.1f} |")
        if rows:
            self.data["expert_reach"] = record
            self.lines += ["## Does the policy reach its expert? (on the demonstrations' own traffic)", "",
                           "Average delay (s) on the SUMO seed each run's demonstrations were made on (seed s for "
                           "training seed s), mean over seeds: the expert's kept demonstrations replayed as one "
                           "episode, RELED's final policy, IPPO's final policy (same training seed) and greedy.", "",
                           "| setting | seeds | expert | RELED policy | IPPO policy | greedy |",
                           "|---|---|---|---|---|---|", *rows, "",
                           reproduce("--only a,resco", "--algos ippo,reled"), ""]

    # -- RESCO timing targets -------------------------------------------------------------------
    def resco(self) -> None:
        runs = self.runs("resco")
        rows = []
        for net in dict.fromkeys(r.scenario for r in runs):
            refs = self.heuristics(net, "moderate", resco=True)
            best = min((v["delay"] for k, v in refs.items() if k != "fixed"), default=None)
            for algo in dict.fromkeys(r.algo for r in runs):
                curves = self.curves([r for r in runs if r.scenario == net and r.algo == algo])
                if not curves:
                    continue
                final = float(np.mean([c.final for c in curves]))
                goal = 0.9 * PUBLISHED_RESCO_BEST[net] if net in PUBLISHED_RESCO_BEST else None
                verdict = "–" if goal is None or algo != "reled" else \
                    f"≤ {goal:.1f} s: {'MET' if final <= goal else 'NOT MET'}"
                self.data.setdefault("resco", {}).setdefault(net, {})[algo] = {"last10_mean": final, "goal": goal,
                                                                               "best_heuristic": best}
                best_text = f"{best:.1f}" if best is not None else "–"
                rows.append(f"| {net} | {algo} | {len(curves)} | {final:.1f} ± "
                            f"{np.std([c.final for c in curves]):.1f} | {best_text} | {verdict} |")
        if rows:
            self.lines += ["## RESCO's timing: against the published figures", "",
                           "Target: 10% below RESCO's best published figure (cologne8 21.6 s, ingolstadt7 31.2 s).", "",
                           "| net | algo | seeds | last-10 delay (s) | best heuristic (s) | target |",
                           "|---|---|---|---|---|---|", *rows, "", reproduce("--only resco"), ""]

    # -- (c) scalability ------------------------------------------------------------------------
    def scalability(self) -> None:
        nets = ("grid2x2", "cologne1", "cologne3", "cologne8", "orlando", "grid4x4", "hong_kong", "grid6x6")
        points: dict[str, list[tuple[int, float | None, str]]] = {}
        self.lines += ["## (c) Scalability: agent-steps to reach max-pressure's delay", "",
                       "Agents are the controlled lights (Hong Kong's net has 23 signals, 18 of them with a choice; "
                       "Orlando's 21, 12).", "",
                       "| scenario | agents | algo | steps to max-pressure (seed 0, "
                       f"{REACH_WINDOW} evaluations ≤ it) |",
                       "|---|---|---|---|"]
        for net in nets:
            refs = self.heuristics(net, "moderate")
            runs = [r for r in self.profile.runs if r.scenario == net and r.demand == "moderate" and not r.variant
                    and not r.timing and r.algo in ("ippo", "reled")]
            if not refs or not runs:
                continue
            for algo in ("ippo", "reled"):
                curves = self.curves([r for r in runs if r.algo == algo and r.seed == 0])
                if not curves:
                    continue
                reach = steps_to(curves, refs["max-pressure"]["delay"])
                agents = agent_count(self.out / "runs" / curves[0].key)
                points.setdefault(algo, []).append((agents, reach, net))
                reach_text = "not reached" if reach is None else f"{reach:,.0f}"
                self.lines.append(f"| {net} | {agents} | {algo} | {reach_text} |")
        self.data["scalability"] = points
        if points:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            budget = max(r.steps for r in self.profile.runs if r.experiment == "c")
            for algo, pts in points.items():
                pts = sorted(pts)
                ax.plot([p[0] for p in pts if p[1] is not None], [p[1] for p in pts if p[1] is not None], "o-",
                        color=COLORS[algo], label=algo)
                missed = [p[0] for p in pts if p[1] is None]  # drawn at the budget: reached later or never
                ax.plot(missed, [budget] * len(missed), "x", ms=9, color=COLORS[algo],
                        label=f"{algo}: not reached in {budget:,} steps" if missed else None)
            ax.set_xlabel("agents (signals)")
            ax.set_ylabel("agent-steps to max-pressure's delay")
            ax.set_title("time to threshold (seed 0)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.figures / "reled_c_scalability.png", dpi=110)
            plt.close(fig)
            self.lines += ["", "![scalability](figures/reled_c_scalability.png)", "",
                           reproduce("--only a,c", "--algos ippo,reled", "--demands moderate", "--seeds 0"), ""]

    # -- (d) generalization ---------------------------------------------------------------------
    def generalization(self) -> None:
        files = sorted((self.out / "zero_shot").glob("*.json"))
        if not files:
            return
        self.lines += ["## (d) Generalization: zero-shot evaluation", "",
                       "Final policies (latest.pt) evaluated without further training on another demand or city.", "",
                       "| trained on | evaluated on | algo | seeds | policy delay (s) | greedy | max-pressure |",
                       "|---|---|---|---|---|---|---|"]
        results: dict[tuple[str, str, str], list[float]] = {}
        refs: dict[str, dict[str, float]] = {}
        for path in files:
            run_key, target = path.stem.split("--")
            algo, rest = run_key.split("-", 1)
            trained = rest.rsplit("-s", 1)[0]
            summary = json.loads(path.read_text())["summary"]["avg_delay"]
            policy = next(k for k in summary if k not in ("fixed", "greedy", "max-pressure"))
            results.setdefault((trained, target, algo), []).append(summary[policy]["mean"])
            scenario, demand = target.rsplit("-", 1)
            refs[target] = {k: v["delay"] for k, v in self.heuristics(scenario, demand).items()}
        for (trained, target, algo), values in sorted(results.items()):
            self.lines.append(f"| {trained} | {target} | {algo} | {len(values)} | {np.mean(values):.1f} ± "
                              f"{np.std(values):.1f} | {refs[target].get('greedy', float('nan')):.1f} | "
                              f"{refs[target].get('max-pressure', float('nan')):.1f} |")
        self.data["zero_shot"] = {f"{t} -> {e} ({a})": v for (t, e, a), v in results.items()}
        self.lines += ["", reproduce("--only d") + " (after the runs of (a) it evaluates)", ""]

    # -- (e) ablations --------------------------------------------------------------------------
    def ablations(self) -> None:
        """(e): every ablation setting's variants beside the full method and IPPO of (a), a table and a figure
        each; the first setting (cologne8 moderate in the full plan) has every variant, later ones a few."""
        runs = self.runs("e")
        for k, setting in enumerate(dict.fromkeys((r.scenario, r.demand) for r in runs)):
            self.ablation_setting([r for r in runs if (r.scenario, r.demand) == setting],
                                  "reled_e_ablations.png" if k == 0 else f"reled_e_ablations_{'_'.join(setting)}.png")

    def ablation_setting(self, runs: list[Run], figure: str) -> None:
        base = runs[0]
        full = self.curves([Run("a", base.scenario, base.demand, "reled", s, base.steps) for s in SEEDS])
        ippo = self.curves([Run("a", base.scenario, base.demand, "ippo", s, base.steps) for s in SEEDS])
        variants = {name: self.curves([r for r in runs if r.variant == name]) for name in ABLATIONS}
        seeds = sorted({c.summary["seed"] for curves in variants.values() for c in curves})
        same = [c for c in full if c.summary["seed"] in seeds]  # the full method on the ablations' seeds
        groups = {"reled (full)": full, f"reled (full), seeds {','.join(map(str, seeds))}": same, **variants,
                  "ippo": ippo}
        if len(same) == len(full):
            groups.pop(f"reled (full), seeds {','.join(map(str, seeds))}")
        groups = {k: v for k, v in groups.items() if v}
        setting = f"{base.scenario}/{base.demand}"
        self.lines += [f"## (e) Ablations on {base.scenario} / {base.demand}", "",
                       "| variant | seeds | last-10 delay (s) | steps to IPPO's final | mean w_k | agents whose expert "
                       "is better | imitation share of the loss |", "|---|---|---|---|---|---|---|"]
        ippo_final = periodic_level(ippo) if ippo else None
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for k, (name, curves) in enumerate(groups.items()):
            grid, mean, std = mean_curve(curves, "delay")
            ax.plot(grid, mean, color=f"C{k}", label=name)
            ax.fill_between(grid, mean - std, mean + std, color=f"C{k}", alpha=0.15)
            reach = steps_to(curves, ippo_final) if ippo_final is not None else None
            rows = [r for c in curves for r in read_csv(self.out / "runs" / c.key / "metrics.csv")]
            diagnostics = [np.mean([float(r[k]) for r in rows if r.get(k)]) if any(r.get(k) for r in rows) else None
                           for k in ("hpo/w_mean", "hpo/gate_open", "loss/imitation_share")]
            texts = ["–" if v is None else f"{v:.2f}" for v in diagnostics]
            self.lines.append(f"| {name} | {len(curves)} | {np.mean([c.final for c in curves]):.1f} ± "
                              f"{np.std([c.final for c in curves]):.1f} | "
                              f"{'–' if reach is None else f'{reach:,.0f}'} | {' | '.join(texts)} |")
            self.data.setdefault("ablations", {}).setdefault(setting, {})[name] = {
                "last10": [c.final for c in curves], "steps_to": reach}
        ax.set_xlabel("agent-steps")
        ax.set_ylabel("evaluation average delay (s)")
        ax.set_ylim(None, 2.0 * (ippo_final or ax.get_ylim()[1]))
        ax.legend(fontsize=8)
        ax.set_title(f"ablations on {base.scenario} / {base.demand}")
        fig.tight_layout()
        fig.savefig(self.figures / figure, dpi=110)
        plt.close(fig)
        self.lines += ["", f"![ablations on {setting}](figures/{figure})", "",
                       reproduce("--only e", f"--scenarios {base.scenario}", f"--demands {base.demand}"), ""]

    def write(self, head: list[str]) -> None:
        missing = [r.key for r in self.profile.runs if load_curve(self.out / "runs" / r.key) is None]
        self.data["missing"] = missing
        tail = ["## Not run yet", "", f"{len(missing)} run(s) of the plan have not finished: "
                + ", ".join(f"`{m}`" for m in missing), ""] if missing else []
        self.page.write_text("\n".join(head + self.lines + tail) + "\n")
        self.page.with_suffix(".json").write_text(json.dumps(self.data, indent=1, default=float) + "\n")
        print(f"wrote {self.page} and {self.page.with_suffix('.json')}")


def machines(out: Path) -> str:
    log = out / "log.jsonl"
    if not log.is_file():
        return "no runs logged"
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    seen = {json.dumps(e["machine"], sort_keys=True) for e in entries}
    total = sum(e["seconds"] for e in entries)
    return f"{len(entries)} logged steps, {total / 3600:.1f} h in all, on " + "; ".join(
        f"{m['cpu']} with {m['cores']} cores (Python {m['python']})" for m in map(json.loads, seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="report the quick profile")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default out/experiments[-quick])")
    parser.add_argument("--page", type=Path, default=None,
                        help="the page to write (default docs/results/reled.md; quick: OUT/reled.md)")
    args = parser.parse_args()
    out = args.out or ROOT / "out" / ("experiments-quick" if args.quick else "experiments")
    page = args.page or (out / "reled.md" if args.quick else ROOT / "docs" / "results" / "reled.md")
    report = Report(out, page, "quick" if args.quick else "full")
    parts = (report.efficiency, report.targets, report.resco, report.expert_reach, report.scalability,
             report.generalization, report.ablations)
    for part in parts:
        part()
    head = ["# RELED vs IPPO vs MAPPO: the paper's experiments on real cities", "",
            "Generated by `tools/experiments/report.py` from the runs of `tools/experiments/run.py` "
            "(`make experiments`). Every learned figure is the final policy's: the mean delay of its last "
            f"{LAST_N} greedy evaluation episodes (SUMO seeds 0-9), averaged over training seeds; the curves "
            "end with that figure. "
            f"Stability: variance of the last {STABILITY_N} periodic evaluations.", "",
            f"Machine and time: {machines(out)}.", "",
            "Reproduce: `make experiments` (every run of the plan, resumable), or one part with "
            "`.venv/bin/python tools/experiments/run.py --only a|c|d|e|resco [--scenarios S] [--demands D] "
            "[--algos A] [--seeds N]` followed by `.venv/bin/python tools/experiments/report.py`; the training "
            "overhead with `.venv/bin/python tools/bench/train_throughput.py`.", ""]
    findings = Path(__file__).with_name(FINDINGS)
    if not args.quick and findings.is_file():  # the reading of the figures, written by hand, kept on regeneration
        head += [findings.read_text().strip(), ""]
    report.write(head)


if __name__ == "__main__":
    main()
