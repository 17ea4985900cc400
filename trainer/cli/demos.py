"""`reled demos generate|show`: LLM expert demonstrations (SED), scored, refined and stored."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from trainer.cli.common import console, progress_bar
from trainer.cli.options import DEMAND, ENV, HORIZON, LLM, SUBSET_SIZE, Flag, Given, OptionGroup, Setting, default_note

GENERATE_REQUEST = "trainer.sed.generate:GenerateRequest"
MODE = Setting(GENERATE_REQUEST, Flag("mode", str, "verified: the LLM proposes, look-ahead simulations choose (the "
                                                   "classical tools are always in the pool); plan: the LLM's timing "
                                                   "plan per subset per horizon, unverified; step: the LLM's phase "
                                                   "per light per decision."))
GENERATE = OptionGroup(
    GENERATE_REQUEST,
    Flag("policy", Path, "Agent checkpoint for D_j", none="a freshly initialised actor, what training starts from"),
    Flag("baselines", bool, "Also run fixed-time and max-pressure on the same seed."),
    Flag("no_llm", bool, "Verified mode without the model: the same search over the classical tools only "
                         "(every figure's no-LLM twin).", "--no-llm/--llm"),
    Flag("follow_llm", bool, "Verified mode: run the LLM's strategy answer whatever the look-ahead says (the pool "
                             "is still evaluated and recorded): what the LLM alone would give. Not verified.",
         "--follow-llm/--verify-llm"),
    Flag("lookahead_workers", int, "Verified mode: SUMO worker processes for the look-aheads.", min=1),
    Flag("lookahead_timeout", float, "Verified mode: seconds a look-ahead may take before its candidate is dropped "
                                     "(counted).", min=1),
    SUBSET_SIZE,
    HORIZON,
)
REFINE = OptionGroup(
    "trainer.sed.refine:RefineConfig",
    Flag("rounds", int, "R: refinement rounds.", min=1, none="1 in verified mode, 3 in plan and step modes"),
    Flag("candidates", int, "Demonstration episodes per round (candidate 0 answers greedily, the others sample).",
         min=1, none="1 in verified mode, 2 in plan and step modes"),
    Flag("temperature", float, "Sampling temperature of candidates 1..", min=0),
    Flag("lam", float, "λ of the score G_j − λ·B_j.", "--lambda", min=0),
    Flag("gamma", float, "γ of G_j and of the bound.", min=0, max=0.999),
    Flag("tau", float, "τ: stop early once every kept B_j ≤ τ.", min=0),
    Flag("seed", int, "SUMO seed of every demonstration episode."),
)


def generate_command(
    scenario: Annotated[str, typer.Option(help="Scenario name or folder.")],
    demand: str = DEMAND,
    mode: str = MODE,
    refine: Given = REFINE,
    out: Annotated[Path | None, typer.Option(help="Demonstration folder "
                                                  + default_note("demos/SCENARIO-DEMAND-MODE"))] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    options: Given = GENERATE,
    llm: Given = LLM,
    env: Given = ENV,
    config: Annotated[Path | None, typer.Option(help="TOML with \\[env] and \\[timing] (as for `reled eval`).")]
    = None,
) -> None:
    """Expert demonstrations for every subset of lights, scored with the non-stationarity bound, refined
    across rounds, the best per subset kept.

    In verified mode (the default) the LLM proposes and the simulator verifies: every 15 minutes, for each
    subset, the classical tools and the LLM's proposals are played forward from the current state in SUMO
    and the best is executed. --no-llm runs the same search without the model.

    Writes OUT/: manifest.json (scores per round and subset, which candidate won each horizon and where it
    came from, model hash, prompt version, validity, tokens, the delay of the kept set replayed together),
    one .npy per column (obs, mask, action, reward, subset, round, candidate, agent, step) and rounds.png.
    """
    from trainer.config import load_env_config
    from trainer.sed.generate import GenerateRequest, generate
    from trainer.sed.llm import LLMSettings
    from trainer.sed.plots import rounds_plot
    from trainer.sed.refine import RefineConfig

    suffix = "-no-llm" if options.get("no_llm") else "-follow-llm" if options.get("follow_llm") else ""
    out = out or Path("demos") / f"{Path(scenario).name}-{demand}-{mode}{suffix}"
    env_config = load_env_config(config, scenario=scenario, demand=demand, **env)
    request = GenerateRequest(env=env_config, mode=mode, llm=LLMSettings(**llm), refine=RefineConfig(**refine),
                              **options)
    refine_config = request.refine.for_mode(mode)
    with progress_bar() as progress:
        tasks: dict[int, Any] = {}

        def hook(r: int, c: int, frac: float) -> None:
            if r not in tasks:
                tasks[r] = progress.add_task(f"round {r}", total=refine_config.candidates)
            progress.update(tasks[r], completed=c + frac, description=f"round {r} candidate {c}")

        def on_round(r: int, demos: list) -> None:
            best = min(demos, key=lambda d: d.episode.metrics["avg_delay"])
            progress.console.print(f"round {r}: best delay {best.episode.metrics['avg_delay']:.1f} s, "
                                   f"validity {sum(d.llm['valid'] for d in demos)}/"
                                   f"{sum(d.llm['calls'] for d in demos)}")

        manifest = generate(request, out, force, hook, on_round)
    print_manifest(manifest)
    console.print(f"wrote {out} and {rounds_plot(manifest, out / 'rounds.png')}")


def print_manifest(manifest: dict[str, Any]) -> None:
    """Per-round and per-subset tables: what `generate` ends with and what `show` prints."""
    console.print(f"[bold]{manifest['scenario']}[/] ({manifest['demand']}), {manifest['mode']} mode, prompt "
                  f"{manifest['prompt_version']}, {manifest['model']['backend']} "
                  f"(sha256 {str(manifest['model']['sha256'])[:12]}), D_j against {manifest['agent_policy']}",
                  highlight=False)
    rounds = Table(title="demonstrations per round")
    for col in ("round", "candidate", "avg delay (s)", "mean B_j", "mean G_j", "valid answers", "tokens in/out",
                "LLM s"):
        rounds.add_column(col, justify="right")
    for r in manifest["rounds"]:
        for cand in r["candidates"]:
            llm = cand["llm"]
            mean_ret = sum(s["ret"] for s in cand["subsets"]) / len(cand["subsets"])
            rounds.add_row(str(r["round"]), str(cand["candidate"]), f"{cand['avg_delay']:.1f}",
                           f"{cand['mean_bound']:.0f}", f"{mean_ret:.2f}", f"{llm['valid']}/{llm['calls']}",
                           f"{llm['prompt_tokens']}/{llm['completion_tokens']}", f"{llm['seconds']:.1f}")
    for name, metrics in manifest.get("baselines", {}).items():
        rounds.add_row(name, "", f"{metrics['avg_delay']:.1f}", "", "", "", "", "")
    console.print(rounds)
    kept = Table(title="kept demonstration per subset")
    for col in ("subset", "lights", "round", "candidate", "G_j", "ε_j", "D_j", "B_j", "G_j − λB_j"):
        kept.add_column(col, justify="right")
    for k, subset in zip(manifest["kept"], manifest["subsets"], strict=True):
        kept.add_row(subset["name"], str(len(subset["lights"])), str(k["round"]), str(k["candidate"]),
                     f"{k['ret']:.2f}", f"{k['epsilon']:.3f}", f"{k['divergence']:.3f}", f"{k['bound']:.0f}",
                     f"{k['score']:.2f}")
    console.print(kept)
    print_attribution(manifest)
    totals = manifest["llm_totals"]
    console.print(f"LLM: {totals['calls']} calls, {totals['validity']:.0%} valid ({totals['invalid']} invalid, "
                  f"{totals['late']} late, {totals['failed']} failed), {totals['prompt_tokens']} prompt + "
                  f"{totals['completion_tokens']} generated tokens, {totals['seconds']:.1f} s; "
                  f"{manifest['rows']} demonstration rows"
                  + ("; stopped early (every B_j <= τ)" if manifest["stopped_early"] else ""), highlight=False)


def print_attribution(manifest: dict[str, Any]) -> None:
    """Verified mode: which candidate won each horizon in every subset's kept demonstration, and where it
    came from; then the run's LLM share, what the LLM's own first choice would have queued, the kept set
    replayed as one episode."""
    if "attribution" in manifest:
        by_round = {(r["round"], c["candidate"]): c for r in manifest["rounds"] for c in r["candidates"]}
        table = Table(title="winner per horizon (bold: LLM)")
        table.add_column("from (min)", justify="right")
        columns: dict[int, dict[float, str]] = {}
        for k, subset in zip(manifest["kept"], manifest["subsets"], strict=True):
            table.add_column(subset["name"])
            demo = by_round[(k["round"], k["candidate"])]
            columns[k["subset"]] = {d["time"]: (f"[bold]{escape(d['kind'])}[/]" if d["source"] == "llm"
                                                else escape(str(d["kind"])))
                                    for d in demo.get("decisions", []) if d["subset"] == k["subset"]}
        times = sorted({t for cells in columns.values() for t in cells})
        start = times[0] if times else 0.0
        for t in times:
            table.add_row(f"{(t - start) / 60:.0f}", *(columns[j].get(t, "") for j in sorted(columns)))
        console.print(table)
        a = manifest["attribution"]
        wins = ", ".join(f"{name} {n}" for name, n in sorted(a["wins"].items(), key=lambda kv: -kv[1]))
        first = (f"; the LLM's own first choice would have queued {a['llm_first_queued_s'] / 3600:.1f} vehicle-hours "
                 f"where the winners queued {a['winner_queued_s_same_choices'] / 3600:.1f} "
                 f"({a['llm_first_compared']} choices)" if a["llm_first_compared"] else "")
        console.print(f"Choices: {a['choices']} (won: {wins}); LLM candidates won {a['llm_wins']} "
                      f"({a['llm_share']:.0%}){first}; {a['failed_lookaheads']} look-aheads failed.", highlight=False)
    if "kept_replay" in manifest:
        console.print(f"Kept set replayed as one episode: average delay {manifest['kept_replay']['avg_delay']:.1f} s.",
                      highlight=False)


def show_command(
    folder: Annotated[Path, typer.Argument(help="A folder written by `reled demos generate`.")],
    plot: Annotated[Path | None, typer.Option(help="Where to draw delay and B_j per round "
                                                   + default_note("FOLDER/rounds.png"))] = None,
) -> None:
    """Scores per round and per subset of a demonstration folder, and the per-round plot."""
    from trainer.sed.plots import rounds_plot
    from trainer.sed.store import load_demos

    demos = load_demos(folder)
    print_manifest(demos.manifest)
    console.print(f"wrote {rounds_plot(demos.manifest, plot or folder / 'rounds.png')}")
