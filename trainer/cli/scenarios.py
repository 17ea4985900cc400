"""`reled`: scenarios, evaluation of controllers and policies; training commands live in ``cli_marl``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from edge_runtime.errors import RELEDError
from trainer.cli_common import BackendOption, EpisodeSecondsOption, RewardOption, console, err_console, user_errors
from trainer.cli_sed import (
    HorizonOption,
    LLMConstraintOption,
    LLMContextOption,
    LLMGpuLayersOption,
    LLMModelOption,
    LLMPrefixOption,
    LLMThreadsOption,
    LLMTimeoutOption,
    LLMUrlOption,
    SubsetSizeOption,
    llm_settings,
)

app = typer.Typer(help="RELED trainer: SUMO scenarios, multi-agent environment, controllers and evaluation.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
scenario_app = typer.Typer(help="Inspect and import scenarios.", no_args_is_help=True)
app.add_typer(scenario_app, name="scenario")
@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)])


@app.command("scenarios")
@user_errors
def scenarios_list() -> None:
    """List every known scenario: synthetic grids, RESCO nets from sumo-rl, imported OSM cities."""
    from trainer.scenarios import list_scenarios

    table = Table(title="scenarios")
    table.add_column("name")
    table.add_column("source")
    for name, source in list_scenarios():
        table.add_row(name, source)
    console.print(table)


@scenario_app.command("list")
@user_errors
def scenario_list() -> None:
    """Same as `reled scenarios`."""
    scenarios_list()


@scenario_app.command("show")
@user_errors
def scenario_show(
    name: Annotated[str, typer.Argument(help="Scenario name or folder.")],
    subset_size: SubsetSizeOption = 4,
    subsets_plot: Annotated[Path | None, typer.Option(help="Draw the network and the agent subsets to this PNG.")]
    = None,
) -> None:
    """Net, timing, demand regimes (vehicles/hour), controlled lights, the SED agent subsets (neighbouring
    lights on the road graph, at most --subset-size each) and provenance of a scenario."""
    from trainer.env import TrafficSignalEnv
    from trainer.scenarios import get_scenario

    scenario = get_scenario(name)
    scenario.check_files()
    console.print(f"[bold]{scenario.name}[/] ({scenario.kind}) {scenario.description}")
    console.print(f"net: {scenario.net}\nsimulated time: {scenario.begin:.0f} .. {scenario.end:.0f} s, "
                  f"left-hand traffic: {scenario.lefthand}")
    t = scenario.timing
    console.print(f"timing: decision every {t.delta:g} s, yellow {t.yellow:g} s, all-red {t.all_red:g} s, "
                  f"green {t.min_green:g}..{t.max_green:g} s")
    demand = Table(title="demand regimes")
    for col in ("regime", "vehicles/hour", "scale", "routes", "description"):
        demand.add_column(col)
    for d in scenario.demands.values():
        demand.add_row(d.name, f"{d.vehicles_per_hour:.0f}", f"{d.scale:g}",
                       ", ".join(r.name for r in d.routes), d.description)
    console.print(demand)
    env = TrafficSignalEnv(scenario=name, resolved=scenario)
    lights = Table(title=f"controlled lights ({len(env.intersections)})")
    for col in ("light", "green phases", "approaches", "incoming lanes"):
        lights.add_column(col)
    for inter in env.intersections:
        lights.add_row(inter.tls_id, str(inter.n_phases), str(inter.approaches), str(len(inter.in_lanes)))
    console.print(lights)
    _show_subsets(env, subset_size, subsets_plot)
    env.close()
    for key, value in scenario.provenance.items():
        console.print(f"[dim]{key}:[/] {value}", highlight=False)


def _show_subsets(env: Any, subset_size: int, plot: Path | None) -> None:
    from trainer.sed.clusters import boundary_lanes, partition, road_graph

    graph = road_graph(env.scenario.net, env.intersections)
    subsets = partition(env.intersections, graph, subset_size)
    table = Table(title=f"agent subsets (K = {subset_size}, greedy from the busiest light)")
    for col in ("subset", "lights (I1, I2, ...)", "road links inside (m)", "boundary lanes"):
        table.add_column(col)
    for subset in subsets:
        links = [f"I{a + 1}-I{b + 1} {graph.gap(x, y):.0f}" for a, x in enumerate(subset.lights)
                 for b, y in enumerate(subset.lights) if a < b and graph.gap(x, y) < float("inf")]
        table.add_row(subset.name, "\n".join(subset.lights), ", ".join(links) or "-",
                      str(len(boundary_lanes(subset, env.intersections, graph))))
    console.print(table)
    if plot:
        from trainer.sed.plots import subsets_map

        subsets_map(env.scenario.net, graph, subsets, f"{env.scenario.name}: agent subsets (K = {subset_size})", plot)
        console.print(f"wrote {plot}")


@scenario_app.command("import")
@user_errors
def scenario_import(
    osm: Annotated[Path, typer.Option("--osm", help="OpenStreetMap XML extract (.osm).")],
    name: Annotated[str, typer.Option("--name", help="Scenario name (folder under $RELED_HOME/scenarios).")],
    vclass: Annotated[list[str], typer.Option("--vclass", help="Vehicle classes whose roads are kept "
                                                                "(repeatable).")] = ["passenger"],  # noqa: B006
    lefthand: Annotated[bool, typer.Option(help="Left-hand traffic (Hong Kong, UK, Japan...).")] = False,
    bbox: Annotated[str | None, typer.Option(help="Keep only WEST,SOUTH,EAST,NORTH (lon/lat).")] = None,
    vehicles_per_hour: Annotated[float, typer.Option(help="Moderate demand; congested scales it.")] = 1800.0,
    seed: Annotated[int, typer.Option(help="Seed of the random demand.")] = 42,
    force: Annotated[bool, typer.Option(help="Rebuild an existing scenario.")] = False,
    if_missing: Annotated[bool, typer.Option(help="Do nothing if the scenario exists.")] = False,
) -> None:
    """Turn an OSM extract into a scenario: netconvert with signal guessing, demand, provenance (ODbL)."""
    from trainer.scenarios import scenarios_home
    from trainer.scenarios.osm_import import import_osm

    if if_missing and (scenarios_home() / name / "scenario.toml").is_file():
        console.print(f"scenario {name} exists in {scenarios_home() / name}; nothing to do")
        return
    box = _parse_bbox(bbox) if bbox else None
    with console.status(f"importing {osm} as {name}..."):
        scenario = import_osm(osm, name, scenarios_home(), vehicle_classes=tuple(vclass), lefthand=lefthand,
                              bbox=box, vehicles_per_hour=vehicles_per_hour, seed=seed, force=force)
    console.print(f"[green]imported[/] {scenario.name} into {scenario.folder}: "
                  f"{len(scenario.controlled or ())} controlled lights")


def _parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError:
        raise RELEDError(f"--bbox must be WEST,SOUTH,EAST,NORTH in degrees, got {text!r}") from None
    if not (west < east and south < north):
        raise RELEDError(f"--bbox {text!r} is empty: need WEST < EAST and SOUTH < NORTH")
    return west, south, east, north


@app.command("eval")
@user_errors
def eval_command(
    scenario: Annotated[str, typer.Option(help="Scenario name (see `reled scenarios`) or folder.")],
    controller: Annotated[str | None, typer.Option(help="Controller(s), comma-separated: fixed, greedy, "
                                                        "max-pressure, random, llm (the SED expert, see "
                                                        "--llm-*) \\[default: fixed, unless --policy is given]")]
    = None,
    policy: Annotated[list[Path] | None, typer.Option(help="Trained policy checkpoint (runs/NAME/best.pt or "
                                                           "latest.pt); repeatable.")] = None,
    demand: Annotated[str, typer.Option(help="Demand regime: moderate or congested.")] = "moderate",
    seeds: Annotated[int, typer.Option(min=1, help="Episodes per controller (SUMO seeds).")] = 3,
    first_seed: Annotated[int, typer.Option(help="First SUMO seed; seeds are consecutive.")] = 0,
    backend: BackendOption = None,
    episode_seconds: EpisodeSecondsOption = None,
    reward: RewardOption = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with \\[env] and \\[timing] settings.")] = None,
    delta: Annotated[float | None, typer.Option(help="Seconds between decisions \\[default: 10]")] = None,
    yellow: Annotated[float | None, typer.Option(help="Yellow seconds \\[default: 3]")] = None,
    all_red: Annotated[float | None, typer.Option(help="All-red seconds \\[default: 2]")] = None,
    min_green: Annotated[float | None, typer.Option(help="Minimum green seconds \\[default: 10]")] = None,
    max_green: Annotated[float | None, typer.Option(help="Maximum green seconds \\[default: 60]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every episode and the summary.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Bar chart PNG of average delay per controller.")] = None,
    gui: Annotated[bool, typer.Option(help="Watch in sumo-gui (needs a display; uses TraCI).")] = False,
    llm_mode: Annotated[str, typer.Option(help="LLM expert mode: plan or step.")] = "plan",
    subset_size: SubsetSizeOption = 4,
    horizon: HorizonOption = 900.0,
    llm_model: LLMModelOption = "smollm2",
    llm_url: LLMUrlOption = None,
    llm_constraint: LLMConstraintOption = "grammar",
    llm_threads: LLMThreadsOption = 2,
    llm_context: LLMContextOption = 4096,
    llm_gpu_layers: LLMGpuLayersOption = 0,
    llm_prefix_reuse: LLMPrefixOption = True,
    llm_timeout: LLMTimeoutOption = 30.0,
) -> None:
    """Evaluate controllers and trained policies: a table per controller (one row per seed) and mean ± std
    over seeds. Policies act deterministically (their most probable valid phase)."""
    from trainer.config import load_env_config
    from trainer.controllers import make_controller
    from trainer.evaluate import evaluate
    from trainer.scenarios import get_scenario
    from trainer.sumo_tools import sumo_home

    names = [c.strip() for c in (controller or ("" if policy else "fixed")).split(",") if c.strip()]
    controllers = [make_controller(name) for name in names if name != "llm"]
    if gui:
        if not os.environ.get("DISPLAY"):
            raise RELEDError("--gui needs a display, but DISPLAY is not set: run without --gui or on a desktop")
        backend = "traci"
    timing = {"delta": delta, "yellow": yellow, "all_red": all_red, "min_green": min_green,
              "max_green": max_green}
    env_config = load_env_config(config, scenario=scenario, demand=demand, backend=backend,
                                 episode_seconds=episode_seconds, reward=reward, gui=gui or None,
                                 timing=timing)
    resolved = get_scenario(scenario)
    resolved.demand(demand)
    resolved.check_files()
    sumo_home()
    if policy:
        from trainer.marl.policy import load_policy_controller

        controllers += [load_policy_controller(path, resolved, env_config) for path in policy]
    llm_backend = None
    if "llm" in names:
        from trainer.sed.experts import make_expert
        from trainer.sed.llm import open_backend

        llm_backend = open_backend(llm_settings(llm_model, llm_url, llm_constraint, llm_threads, llm_context,
                                                llm_gpu_layers, llm_prefix_reuse, llm_timeout))
        controllers.insert(names.index("llm"), make_expert(llm_backend, llm_mode, subset_size=subset_size,
                                                           horizon_s=horizon))
    seed_list = list(range(first_seed, first_seed + seeds))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                  disable=not err_console.is_terminal) as progress:
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

    for table in episode_tables(results):
        console.print(table)
    for expert in controllers:
        if hasattr(expert, "total_stats"):
            stats = expert.total_stats()
            console.print(f"LLM expert: {stats.calls} calls, {stats.validity:.0%} valid ({stats.invalid} invalid, "
                          f"{stats.late} late, {stats.failed} failed: held the plan or phase), "
                          f"{stats.prompt_tokens} prompt + {stats.completion_tokens} generated tokens, "
                          f"{stats.seconds:.1f} s", highlight=False)
    console.print(summary_table(results, f"{resolved.name} / {demand}: mean ± std over {seeds} seed(s)"))
    if json_out:
        write_eval_json(json_out, resolved, demand, env_config, results)
        console.print(f"wrote {json_out}")
    if plot:
        from trainer.evaluate import summarise
        from trainer.plots import bar_chart

        bar_chart(summarise(results, "avg_delay"), "average delay per vehicle (s)",
                  f"{resolved.name} ({demand}), {seeds} seed(s)", plot)
        console.print(f"wrote {plot}")


def _register_training_commands() -> None:
    from trainer import cli_export, cli_marl, cli_sed

    cli_marl.register(app)
    cli_sed.register(app)
    cli_export.register(app)


_register_training_commands()
