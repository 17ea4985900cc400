"""What OSM and SUMO-net imports share: argument checks, the controlled lights, demand, speed caps, provenance.

``osm_import`` and ``net_import`` differ only in how they get a net; from the net on they call these
functions, so both kinds of scenario choose their lights, build their demand and record their origin alike.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sumolib

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import sha256_file
from trainer.scenarios.demand import MODERATE_SCALE, generate_random_trips
from trainer.scenarios.demand import vehicles_per_hour as measure_vehicles_per_hour
from trainer.scenarios.model import DemandRegime, Scenario
from trainer.sim.sumo_tools import run_sumo_command, sumo_binary

log = logging.getLogger(__name__)

DEFAULT_VEHICLE_CLASSES = ("passenger",)
MIN_APPROACHES = 2  # one approach: a merge or a crossing on a one-way road, nothing conflicts
MIN_CROSSING_DEG = 45.0  # approaches meeting at less (as lines) are the two directions of one road
MIN_GREEN_PHASES = 2  # a policy needs at least two greens to choose between
FRINGE_FACTOR = 10.0  # trips mostly start and end at the net's edge, like through traffic
MIN_TRIP_DISTANCE_M = 300.0  # straight-line origin-destination distance, capped to half the net diagonal
CONTROLLED_RULE = (f">= {MIN_APPROACHES} approaches (incoming edges) from crossing directions "
                   f"(>= {MIN_CROSSING_DEG:g} degrees apart as lines) and >= {MIN_GREEN_PHASES} distinct green phases")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_GENERATED_HEADER = re.compile(rb"<!-- generated on .*?-->\s*", re.DOTALL)


@dataclass(frozen=True)
class LightReport:
    """One traffic light of the imported net and whether an agent controls it."""

    id: str
    approaches: int
    crossing: bool  # two approaches meet at an angle: not just both directions of one road
    green_phases: int

    @property
    def controlled(self) -> bool:
        return self.approaches >= MIN_APPROACHES and self.crossing and self.green_phases >= MIN_GREEN_PHASES

    @property
    def reason(self) -> str:
        if self.controlled:
            return (f"intersection: {self.approaches} approaches from crossing directions, "
                    f"{self.green_phases} green phases")
        if self.approaches < MIN_APPROACHES or not self.crossing:
            return (f"kept fixed-time: {self.approaches} approach(es) along one road, "
                    f"a mid-block crossing or a merge")
        return f"kept fixed-time: only {self.green_phases} green phase(s), nothing to choose"

    def as_toml(self) -> dict[str, Any]:
        return {"id": self.id, "approaches": self.approaches, "crossing": self.crossing,
                "green_phases": self.green_phases, "controlled": self.controlled, "reason": self.reason}


@dataclass(frozen=True)
class ImportDemand:
    """The demand settings every import takes: random trips at a rate and seed over a window."""

    vehicles_per_hour: float
    congested_scale: float
    seed: int
    begin: float
    end: float


def check_arguments(name: str, demand: ImportDemand, max_speed_kmh: float | None) -> None:
    """Reject bad arguments before any file is touched."""
    if not _NAME.fullmatch(name):
        raise RELEDError(f"bad scenario name {name!r}: use letters, digits, '_', '-' or '.' (no slashes)")
    if demand.vehicles_per_hour <= 0:
        raise RELEDError(f"vehicles per hour must be > 0, got {demand.vehicles_per_hour}")
    if demand.congested_scale <= MODERATE_SCALE:
        raise RELEDError(f"congested scale must be > {MODERATE_SCALE:g} (more than moderate), "
                         f"got {demand.congested_scale}")
    if demand.end <= demand.begin:
        raise RELEDError(f"end ({demand.end} s) must be after begin ({demand.begin} s)")
    if max_speed_kmh is not None and max_speed_kmh <= 0:
        raise RELEDError(f"--max-speed must be > 0 km/h, got {max_speed_kmh}")


def strip_generated_header(path: Path) -> None:
    """SUMO tools write the wall-clock time and absolute temp paths in header comments; remove them.

    Without this two imports with the same seed would differ; the same facts go to the provenance.
    Route files get two (randomTrips.py's, then duarouter's).
    """
    path.write_bytes(_GENERATED_HEADER.sub(b"", path.read_bytes()))


def sumo_version() -> str:
    """The netconvert that actually ran, e.g. '1.28.0'."""
    first = run_sumo_command([sumo_binary("netconvert"), "--version"], "netconvert --version").splitlines()[0]
    return first.rsplit(" ", 1)[-1]


def cap_speeds(net: Path, max_speed_kmh: float) -> int:
    """Lower every edge faster than ``max_speed_kmh`` to it, in place; returns how many edges changed.

    netconvert applies the new speeds to the loaded net, so connections and signal programs stay as they
    are and the turn speeds inside junctions follow. SUMO's OSM defaults (80-100 km/h on primary roads)
    are far above urban limits.
    """
    limit = max_speed_kmh / 3.6
    fast = [edge.getID() for edge in sumolib.net.readNet(str(net)).getEdges() if edge.getSpeed() > limit + 0.01]
    if not fast:
        return 0
    root = ET.Element("edges")
    for edge_id in fast:
        ET.SubElement(root, "edge", id=edge_id, speed=f"{limit:.2f}")
    patch = net.with_name("speed_cap.edg.xml")
    capped = net.with_name("capped.net.xml")
    ET.ElementTree(root).write(patch, encoding="UTF-8", xml_declaration=True)
    try:
        run_sumo_command([sumo_binary("netconvert"), "--sumo-net-file", net.name, "--edge-files", patch.name,
                          "--output-file", capped.name], f"capping speeds of {net.name}", cwd=net.parent)
    finally:
        patch.unlink(missing_ok=True)
    capped.replace(net)
    strip_generated_header(net)
    log.info("%s: %d edges capped at %g km/h", net.name, len(fast), max_speed_kmh)
    return len(fast)


def read_lights(net: Path, vehicle_classes: tuple[str, ...]) -> tuple[list[LightReport], float]:
    """Every traffic light with its approaches and green phases, and the random trips' min distance."""
    sumo_net = sumolib.net.readNet(str(net), withPrograms=True)
    lights = [_light_report(tls, vehicle_classes) for tls in sumo_net.getTrafficLights()]
    (xmin, ymin), (xmax, ymax) = sumo_net.getBBoxXY()
    min_distance = min(MIN_TRIP_DISTANCE_M, math.hypot(xmax - xmin, ymax - ymin) / 2)
    return sorted(lights, key=lambda light: light.id), min_distance


def _light_report(tls: sumolib.net.TLS, vehicle_classes: tuple[str, ...]) -> LightReport:
    """Approaches: distinct incoming edges of the light's links that the kept vehicles may use."""
    headings = {lane_in.getEdge().getID(): _heading(lane_in) for lane_in, _, _ in tls.getConnections()
                if any(lane_in.allows(vc) for vc in vehicle_classes)}
    crossing = any(_line_angle(a, b) >= MIN_CROSSING_DEG for a in headings.values() for b in headings.values())
    greens = {phase.state for program in tls.getPrograms().values() for phase in program.getPhases()
              if ("G" in phase.state or "g" in phase.state) and "y" not in phase.state}
    return LightReport(tls.getID(), len(headings), crossing, len(greens))


def _heading(lane: sumolib.net.lane.Lane) -> float:
    """Direction (degrees) in which a lane enters its junction: its last shape segment."""
    (x1, y1), (x2, y2) = lane.getShape()[-2:]
    return math.degrees(math.atan2(y2 - y1, x2 - x1))


def _line_angle(a: float, b: float) -> float:
    """Angle between two headings taken as lines: 0 for the same or opposite directions, at most 90."""
    diff = abs(a - b) % 180.0
    return min(diff, 180.0 - diff)


def controlled_lights(lights: list[LightReport], source: str, fix: str) -> tuple[str, ...]:
    """IDs of the lights at real intersections, or an error naming ``fix``."""
    if not lights:
        raise RELEDError(f"no traffic lights in {source}: {fix}")
    for light in lights:
        log.info("light %s: %s", light.id, light.reason)
    controlled = tuple(light.id for light in lights if light.controlled)
    if not controlled:
        raise RELEDError(f"none of the {len(lights)} traffic lights in {source} is at a real intersection "
                         f"({CONTROLLED_RULE}; these guard mid-block crossings or merges): {fix}")
    return controlled


def lights_provenance(lights: list[LightReport]) -> dict[str, Any]:
    """The lights part of an import's provenance: every light, controlled or not, and why."""
    return {"lights_total": len(lights), "lights_controlled": sum(light.controlled for light in lights),
            "controlled_rule": CONTROLLED_RULE, "lights": [light.as_toml() for light in lights]}


def make_demand(net: Path, routes: Path, demand: ImportDemand, *, min_distance: float, vehicle_class: str,
                fix: str) -> float:
    """Random fringe-to-fringe trips, routed; returns the vehicles/hour kept, failing with ``fix`` if none route."""
    started = time.perf_counter()
    generate_random_trips(net, routes, vehicles_per_hour=demand.vehicles_per_hour, begin=demand.begin,
                          end=demand.end, seed=demand.seed, fringe_factor=FRINGE_FACTOR, min_distance=min_distance,
                          vehicle_class=vehicle_class)
    strip_generated_header(routes)
    measured = measure_vehicles_per_hour([routes], demand.begin, demand.end)
    if measured <= 0:
        raise RELEDError(f"no routable trips on {net.name}: its roads do not connect; {fix}")
    log.info("demand %s: %.0f veh/h in %.1f s", routes.name, measured, time.perf_counter() - started)
    return measured


def common_provenance(source: Path, demand: ImportDemand, importer: str) -> dict[str, Any]:
    """What every import records: the source file and its sha256, the importer, the demand, SUMO, the date."""
    return {"source": source.name, "source_sha256": sha256_file(source), "importer": importer,
            "seed": demand.seed, "congested_scale": demand.congested_scale,
            "sumo_version": sumo_version(), "imported_on": dt.datetime.now(dt.UTC).date().isoformat()}


def imported_scenario(name: str, net: Path, routes: Path, base: float, demand: ImportDemand, *,
                      controlled: tuple[str, ...], lefthand: bool, provenance: dict[str, Any],
                      description: str) -> Scenario:
    """The scenario with its two demand regimes on one route file (SUMO --scale sets the level)."""
    trips = f"random trips (randomTrips.py, fringe factor {FRINGE_FACTOR:g}, seed {demand.seed}), {base:.0f} veh/h"
    scale = demand.congested_scale
    return Scenario(
        name=name, kind="imported", net=net, begin=demand.begin, end=demand.end, folder=net.parent,
        demands={
            "moderate": DemandRegime("moderate", (routes,), MODERATE_SCALE, base * MODERATE_SCALE, trips),
            "congested": DemandRegime("congested", (routes,), scale, base * scale, f"moderate scaled by {scale:g}"),
        },
        controlled=controlled, lefthand=lefthand, provenance=provenance, description=description,
    )

