"""`reled eval`: controllers and trained policies over seeded SUMO episodes, as tables, JSON and a plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from edge_runtime.errors import RELEDError
from trainer.cli.common import console, progress_bar
from trainer.cli.options import (
    DEMAND,
    ENV,
    ENV_CONFIG,
    HORIZON,
    LLM,
    LLM_EXPERT,
    SUBSET_SIZE,
    Flag,
    Given,
    OptionGroup,
    Setting,
    default_note,
)

# None means "not given": the --config file's [timing] is kept, else the scenario's own timing, which
# is RELED's default timing (DecisionTiming's defaults) unless its scenario.toml sets one.
TIMING = OptionGroup(
    "trainer.scenarios:DecisionTiming",
    Flag("delta", float, "Seconds between decisions"),
    Flag("yellow", float, "Yellow seconds"),
    Flag("all_red", float, "All-red seconds"),
    Flag("min_green", float, "Minimum green seconds"),
    Flag("max_green", float, "Maximum green seconds"),
)
GUI = Setting(ENV_CONFIG, Flag("gui", bool, "Watch in sumo-gui (needs a display; uses TraCI)."))
LLM_MODE = Setting(LLM_EXPERT, Flag("mode", str, "LLM expert mode: verified, plan or step (see `reled demos "
                                                 "generate --help`).", "--llm-mode"))
EXPERT = OptionGroup(LLM_EXPERT, SUBSET_SIZE, HORIZON)


def eval_command(
    scenario: Annotated[str, typer.Option(help="Scenario name (see `reled scenarios`) or folder.")],
    controller: Annotated[str | None, typer.Option(help="Controller(s), comma-separated: fixed, greedy, "
                                                        "max-pressure, random, llm (the SED expert, see --llm-*) "
                                                        + default_note("fixed, unless --policy is given"))]
    = None,
    policy: Annotated[list[Path] | None, typer.Option(help="Trained policy checkpoint (runs/NAME/best.pt or "
                                                           "latest.pt) or exported model (.onnx, run by ONNX "
                                                           "Runtime as on a controller); repeatable.")] = None,
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="Run --policy on a scenario it was not trained on "
                                                                "(the shared actor fits any number of lights); "
                                                                "labelled 'zero-shot from' its own.")] = False,
    demand: str = DEMAND,
    seeds: Annotated[int, typer.Option(min=1, help="Episodes per controller (SUMO seeds).")] = 3,
    first_seed: Annotated[int, typer.Option(help="First SUMO seed; seeds are consecutive.")] = 0,
    env: Given = ENV,
    config: Annotated[Path | None, typer.Option(help="TOML file with \\[env] and \\[timing] settings "
                                                     "(configs/resco_timing.toml: RESCO's timing).")] = None,
    timing: Given = TIMING,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every episode and the summary.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Bar chart PNG of average delay per controller.")] = None,
    gui: bool = GUI,
    llm_mode: str = LLM_MODE,
    expert: Given = EXPERT,
    llm: Given = LLM,
) -> None:
    """Evaluate controllers and trained policies: a table per controller (one row per seed) and mean ± std
    over seeds. Policies act deterministically (their most probable valid phase).

    Signals keep the scenario's timing (RELED's default timing unless it sets one) unless --config or flags change it.
    """
    from trainer.config import load_env_config
    from trainer.controllers import make_controller
    from trainer.evaluate import evaluate, summarise_metrics
    from trainer.scenarios import get_scenario
    from trainer.sim.sumo_tools import sumo_home

    if zero_shot and not policy:
        raise RELEDError("--zero-shot runs a trained policy on another scenario: give it with --policy CKPT")
    names = [c.strip() for c in (controller or ("" if policy else "fixed")).split(",") if c.strip()]
    controllers = [make_controller(name) for name in names if name != "llm"]
    if gui:
        if not os.environ.get("DISPLAY"):
            raise RELEDError("--gui needs a display, but DISPLAY is not set: run without --gui or on a desktop")
        env["backend"] = "traci"
    env_config = load_env_config(config, scenario=scenario, demand=demand, gui=gui or None, timing=timing, **env)
    resolved = get_scenario(scenario)
    resolved.demand(demand)
    resolved.check_files()
    sumo_home()
    policies = []
    if policy:
        from trainer.controllers.onnx_policy import OnnxController
        from trainer.marl.policy import load_policy_controller

        policies = [load_policy_controller(path, resolved, env_config, zero_shot) for path in policy
                    if path.suffix != ".onnx"]
        controllers += policies + [OnnxController(path) for path in policy if path.suffix == ".onnx"]
    llm_backend = None
    if "llm" in names:
        from trainer.sed.experts import make_expert
        from trainer.sed.llm import LLMSettings, open_backend

        llm_backend = open_backend(LLMSettings(**llm))
        controllers.insert(names.index("llm"), make_expert(llm_backend, llm_mode, **expert))
    seed_list = list(range(first_seed, first_seed + seeds))
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=len(controllers) * len(seed_list))
        done: dict[tuple[str, int], float] = {}

        def hook(name: str, seed: int, frac: float) -> None:
            done[(name, seed)] = frac
            progress.update(task, completed=sum(done.values()), description=f"{name} seed {seed}")

        try:
            results = evaluate(resolved, controllers, seed_list, env_config, hook)
        finally:
            if llm_backend is not None:
                llm_backend.close()
    from trainer.report import episode_tables, summary_table, write_eval_json

    summary = summarise_metrics(results)
    for table in episode_tables(results):
        console.print(table)
    for expert_controller in controllers:
        if hasattr(expert_controller, "total_stats"):
            stats = expert_controller.total_stats()
            console.print(f"LLM expert: {stats.calls} calls, {stats.validity:.0%} valid ({stats.invalid} invalid, "
                          f"{stats.late} late, {stats.failed} failed: held the plan or phase), "
                          f"{stats.prompt_tokens} prompt + {stats.completion_tokens} generated tokens, "
                          f"{stats.seconds:.1f} s", highlight=False)
    console.print(summary_table(summary, f"{resolved.name} / {demand}: mean ± std over {seeds} seed(s)"))
    if json_out:
        origins = {p.name: p.origin for p in policies if p.origin is not None}
        write_eval_json(json_out, resolved, demand, env_config, results, summary, origins)
        console.print(f"wrote {json_out}")
    if plot:
        from trainer.plots import bar_chart

        bar_chart(summary.metrics["avg_delay"], "average delay per vehicle (s)",
                  f"{resolved.name} ({demand}), {seeds} seed(s)", plot)
        console.print(f"wrote {plot}")
