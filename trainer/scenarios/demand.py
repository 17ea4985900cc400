"""Demand: random trips for generated and imported nets, and counting the vehicles of route files."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from edge_runtime.errors import RELEDError
from trainer.sim.sumo_tools import run_sumo_command, sumo_tool

# Regime scale factors applied with SUMO's --scale on top of a scenario's base route file.
MODERATE_SCALE = 1.0
CONGESTED_SCALE = 1.5


def generate_random_trips(net: Path, out: Path, *, vehicles_per_hour: float, begin: float, end: float,
                          seed: int, fringe_factor: float = 10.0, min_distance: float = 300.0,
                          vehicle_class: str = "passenger") -> Path:
    """Routed random trips, mostly from fringe to fringe, deterministic for a seed.

    ``--validate`` routes every trip with duarouter and drops the unroutable ones, so
    the file loads cleanly; the vehicles/hour actually kept is measured afterwards.
    """
    if vehicles_per_hour <= 0:
        raise RELEDError(f"vehicles per hour must be > 0, got {vehicles_per_hour}")
    period = 3600.0 / vehicles_per_hour
    run_sumo_command([
        str(sumo_tool("randomTrips.py")), "-n", str(net), "-r", str(out),
        "-o", str(out.with_suffix(".trips.xml")), "-b", str(begin), "-e", str(end),
        "-p", f"{period:.6f}", "--seed", str(seed), "--fringe-factor", str(fringe_factor),
        "--min-distance", str(min_distance), "--vehicle-class", vehicle_class, "--validate",
        "--remove-loops", "--prefix", "veh", "--trip-attributes", 'departLane="best" departSpeed="max"',
    ], "random trip generation")
    out.with_suffix(".trips.xml").unlink(missing_ok=True)
    for extra in out.parent.glob(out.stem + "*.alt.xml"):
        extra.unlink()
    return out


def count_vehicles(route_files: tuple[Path, ...] | list[Path], begin: float, end: float) -> float:
    """Vehicles departing within [begin, end) over all files: vehicles, trips and flows."""
    total = 0.0
    for path in route_files:
        try:
            for _, el in ET.iterparse(path):
                if el.tag in ("vehicle", "trip"):
                    total += begin <= float(el.get("depart", "0") or 0) < end
                elif el.tag == "flow":
                    total += _flow_count(el, begin, end)
                if el.tag in ("vehicle", "trip", "flow"):
                    el.clear()
        except (ET.ParseError, FileNotFoundError) as exc:
            raise RELEDError(f"route file {path} cannot be read ({exc}); regenerate it") from exc
    return total


def vehicles_per_hour(route_files: tuple[Path, ...] | list[Path], begin: float, end: float) -> float:
    return count_vehicles(route_files, begin, end) * 3600.0 / max(end - begin, 1.0)


def _flow_count(el: ET.Element, begin: float, end: float) -> float:
    f_begin = max(float(el.get("begin", begin)), begin)
    f_end = min(float(el.get("end", end)), end)
    span = max(f_end - f_begin, 0.0)
    if el.get("number") is not None:
        full = float(el.get("end", end)) - float(el.get("begin", begin))
        return float(el.get("number")) * (span / full if full > 0 else 1.0)
    if el.get("vehsPerHour") is not None:
        return float(el.get("vehsPerHour")) * span / 3600.0
    if el.get("period") is not None:
        return span / float(el.get("period").split("(")[-1].rstrip(")"))
    if el.get("probability") is not None:
        return float(el.get("probability")) * span
    return 0.0
