"""`reled scenarios` and `reled scenario show|import`: what can be simulated; bringing in OSM cities and SUMO nets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edge_runtime.errors import RELEDError
from trainer.cli.common import console
from trainer.cli.options import LLM_EXPERT, SUBSET_SIZE, Flag, Given, OptionGroup, Setting

SUBSETS = Setting(LLM_EXPERT, SUBSET_SIZE)
# import_osm and import_net share these parameters and their defaults.
IMPORT = OptionGroup(
    "trainer.scenarios.osm_import:import_osm",
    Flag("vehicle_classes", list[str], "--osm only: vehicle classes whose roads are kept (repeatable).", "--vclass"),
    Flag("vehicles_per_hour", float, "Moderate demand."),
    Flag("congested_scale", float, "Congested demand: the moderate trips with SUMO's --scale.", min=1.0),
    Flag("seed", int, "Seed of the random demand."),
    Flag("max_speed_kmh", float, "Cap edge speeds above this (km/h), e.g. 50 for a city's limit: SUMO's OSM "
                                 "defaults reach 80-100 km/h.", "--max-speed", none="no cap"),
    Flag("force", bool, "Rebuild an existing scenario."),
)
SIDE = OptionGroup(
    "trainer.scenarios.net_import:import_net",
    Flag("lefthand", bool, "Traffic side (left: Hong Kong, UK, Japan...). A --net on the other side is rebuilt: "
                           "connections recomputed, signals guessed anew.", "--lefthand/--righthand",
         none="--osm: righthand; --net: the net's own"),
)


def list_command() -> None:
    """List every known scenario: synthetic grids, RESCO nets from sumo-rl, imported OSM cities."""
    from trainer.scenarios import list_scenarios

    table = Table(title="scenarios")
    table.add_column("name")
    table.add_column("source")
    for name, source in list_scenarios():
        table.add_row(name, source)
    console.print(table)


def show_command(
    name: Annotated[str, typer.Argument(help="Scenario name or folder.")],
    subset_size: int = SUBSETS,
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


def import_command(
    name: Annotated[str, typer.Option("--name", help="Scenario name (folder under $RELED_HOME/scenarios).")],
    osm: Annotated[Path | None, typer.Option("--osm", help="OpenStreetMap XML extract (.osm).")] = None,
    net: Annotated[Path | None, typer.Option("--net", help="SUMO net (.net.xml), e.g. edited in netedit.")] = None,
    options: Given = IMPORT,
    side: Given = SIDE,
    bbox: Annotated[str | None, typer.Option(help="--osm only: keep WEST,SOUTH,EAST,NORTH (lon/lat).")] = None,
    if_missing: Annotated[bool, typer.Option(help="Do nothing if the scenario exists.")] = False,
) -> None:
    """Turn an OSM extract (netconvert with signal guessing) or a SUMO net (kept as it is, or rebuilt for the
    other traffic side) into a scenario: controlled lights, random-trip demand, provenance and licence."""
    from trainer.scenarios import scenarios_home

    if (osm is None) == (net is None):
        raise RELEDError("give exactly one of --osm FILE.osm or --net FILE.net.xml")
    if if_missing and (scenarios_home() / name / "scenario.toml").is_file():
        console.print(f"scenario {name} exists in {scenarios_home() / name}; nothing to do")
        return
    with console.status(f"importing {osm or net} as {name}..."):
        if osm is not None:
            from trainer.scenarios.osm_import import import_osm

            if "vehicle_classes" in options:
                options["vehicle_classes"] = tuple(options["vehicle_classes"])
            box = _parse_bbox(bbox) if bbox else None
            scenario = import_osm(osm, name, scenarios_home(), bbox=box, **options, **side)
        else:
            from trainer.scenarios.net_import import import_net

            if "vehicle_classes" in options or bbox:
                raise RELEDError("--vclass and --bbox apply to --osm imports: a --net import keeps the net's "
                                 "roads as they are")
            scenario = import_net(net, name, scenarios_home(), **options, **side)
    prov = scenario.provenance
    console.print(f"[green]imported[/] {scenario.name} into {scenario.folder}: {prov['lights_controlled']} of "
                  f"{prov['lights_total']} lights controlled, licence {scenario.licence}")


def _parse_bbox(text: str) -> tuple[float, float, float, float]:
    try:
        west, south, east, north = (float(v) for v in text.split(","))
    except ValueError:
        raise RELEDError(f"--bbox must be WEST,SOUTH,EAST,NORTH in degrees, got {text!r}") from None
    if not (west < east and south < north):
        raise RELEDError(f"--bbox {text!r} is empty: need WEST < EAST and SOUTH < NORTH")
    return west, south, east, north
