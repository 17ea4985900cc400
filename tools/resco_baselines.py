"""Our fixed-time / greedy / max-pressure on RESCO nets beside the published RESCO figures.

Run by hand (a few minutes on 2 cores):  .venv/bin/python tools/resco_baselines.py --seeds 3
Writes a Markdown table and a grouped bar chart (default: docs/results/results_resco_baselines.md and
docs/results/figures/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from edge_runtime.fileio import atomic_path, atomic_write_text
from trainer.controllers import make_controller
from trainer.env import EnvConfig
from trainer.evaluate import evaluate, summarise
from trainer.scenarios import get_scenario

# Published average delay (s): RESCO (Ault & Sharon 2021, "Reinforcement Learning Benchmarks for Traffic Signal
# Control", NeurIPS Datasets and Benchmarks), its heuristics' table.
PUBLISHED = {
    "cologne1": {"fixed": 56.6, "greedy": 27.8, "max-pressure": 65.9},
    "cologne3": {"fixed": 46.4, "greedy": 90.7, "max-pressure": 162.3},
    "cologne8": {"fixed": 63.8, "greedy": 21.9, "max-pressure": 47.7},
    "ingolstadt1": {"fixed": 39.4, "greedy": 28.3, "max-pressure": 23.6},
    "ingolstadt7": {"fixed": 91.3, "greedy": 80.6, "max-pressure": 46.8},
    "grid4x4": {"greedy": 34.3, "max-pressure": 52.6},
}
CONTROLLERS = ["fixed", "greedy", "max-pressure"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", default="cologne3,cologne8,ingolstadt7", help="comma-separated RESCO nets")
    parser.add_argument("--seeds", type=int, default=3, help="SUMO seeds per controller (default 3)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/results_resco_baselines.md"))
    parser.add_argument("--figure", type=Path, default=Path("docs/results/figures/resco_baselines.png"))
    args = parser.parse_args()
    rows, results_json = [], {}
    for net in args.nets.split(","):
        scenario = get_scenario(net)
        results = evaluate(scenario, [make_controller(c) for c in CONTROLLERS], list(range(args.seeds)),
                           EnvConfig(scenario=net))
        delay = summarise(results, "avg_delay")
        teleports = summarise(results, "teleports")
        results_json[net] = {c: {"delay_mean": m, "delay_std": s, "teleports_mean": teleports[c][0]}
                             for c, (m, s) in delay.items()}
        for c in CONTROLLERS:
            pub = PUBLISHED.get(net, {}).get(c)
            m, s = delay[c]
            rows.append((net, c, m, s, teleports[c][0], pub))
            print(f"{net:12s} {c:13s} ours {m:7.1f} ± {s:4.1f}  published {pub if pub else '-'}", flush=True)
    lines = ["| scenario | controller | ours: avg delay (s), mean ± std | teleports (mean) | published RESCO |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {c} | {m:.1f} ± {s:.1f} | {t:.1f} | {p if p is not None else '–'} |"
              for n, c, m, s, t, p in rows]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(results_json, indent=2))
    _plot(rows, args.figure)
    print(f"wrote {args.out} and {args.figure}")


def _plot(rows: list[tuple], path: Path) -> None:
    nets = list(dict.fromkeys(r[0] for r in rows))
    fig, ax = plt.subplots(figsize=(3 * len(nets) + 2, 4))
    width = 0.13
    for j, c in enumerate(CONTROLLERS):
        ours = [next(r for r in rows if r[0] == n and r[1] == c) for n in nets]
        xs = [i + (2 * j - 2.5) * width for i in range(len(nets))]
        ax.bar(xs, [r[2] for r in ours], width, yerr=[r[3] for r in ours], label=f"{c} (ours)")
        ax.bar([x + width for x in xs], [r[5] or 0 for r in ours], width, alpha=0.45, hatch="//",
               label=f"{c} (published)")
    ax.set_xticks(range(len(nets)), nets)
    ax.set_ylabel("average delay per vehicle (s)")
    ax.set_title("RELED's default timing (2 s all-red): our heuristics (SUMO 1.28) vs published RESCO (SUMO 1.9)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


if __name__ == "__main__":
    main()
