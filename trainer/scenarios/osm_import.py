"""Turn an OpenStreetMap extract into a RELED scenario: netconvert, random-trip demand, controlled lights.

``reled scenario import --osm FILE --name NAME`` calls :func:`import_osm`. The folder is built
atomically, byte-for-byte reproducible for a seed, and carries the ODbL attribution the data needs.
See ``docs/osm_import.md`` for the option choices and the measured results on the bundled extracts.
"""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import sumolib
from sumolib.net.lane import is_vehicle_class

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import sha256_file
from trainer.scenarios.demand import CONGESTED_SCALE, MODERATE_SCALE, generate_random_trips
from trainer.scenarios.demand import vehicles_per_hour as measure_vehicles_per_hour
from trainer.scenarios.folder import building_folder
from trainer.scenarios.model import DemandRegime, Scenario, load_scenario_folder, write_scenario_toml
from trainer.sim.sumo_tools import run_sumo_command, sumo_binary

log = logging.getLogger(__name__)

BBox = tuple[float, float, float, float]  # (west, south, east, north) in degrees

LICENCE = "ODbL-1.0"
ATTRIBUTION = "Map data © OpenStreetMap contributors"
MIN_APPROACHES = 3  # fewer incoming roads: a mid-block crossing, not an intersection worth an agent
MIN_GREEN_PHASES = 2  # a policy needs at least two greens to choose between
FRINGE_FACTOR = 10.0  # trips mostly start and end at the extract's edge, like through traffic
MIN_TRIP_DISTANCE_M = 300.0  # straight-line origin-destination distance, capped to half the net diagonal

# Fixed netconvert options; every choice is explained in docs/osm_import.md.
NETCONVERT_OPTIONS: tuple[str, ...] = (
    "--geometry.remove",  # fold shape-only OSM nodes into edge geometry: fewer, longer edges
    "--roundabouts.guess",  # right of way inside roundabouts
    "--ramps.guess",  # acceleration lanes at motorway ramps
    "--junctions.join",  # one junction per dual-carriageway crossing, not four
    "--tls.guess-signals",  # signals tagged on the approach nodes control the junction they surround
    "--tls.discard-simple",  # no light at a plain bend or a lone mid-block crossing node
    "--tls.join",  # one controller for signals a few metres apart (divided roads)
    "--tls.default-type", "static",  # fixed-time plans: the fixed-time baseline and the agents' phase set
    "--no-turnarounds",  # no U-turn links: they add conflicting links to every signal program
    "--remove-edges.isolated",  # drop road fragments joined to nothing
    "--keep-edges.components", "1",  # keep the largest connected road network only: trips stay routable
    "--output.street-names",  # street names, for prompts and plots
)
_SIGNAL_TAGS = {("highway", "traffic_signals"), ("crossing", "traffic_signals")}  # what netconvert reads
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_GENERATED_HEADER = re.compile(rb"<!-- generated on .*?-->\s*", re.DOTALL)
_FIX_EXPORT = ("export the area again as OSM XML "
               "(openstreetmap.org Export, or `osmium cat FILE.pbf -o FILE.osm`)")


@dataclass(frozen=True)
class OsmSummary:
    """What the raw extract holds, read before netconvert so bad input fails with a clear reason."""

    signal_nodes: int
    bounds: BBox | None  # from the <bounds> element, when present


@dataclass(frozen=True)
class LightReport:
    """One traffic light of the converted net and whether an agent controls it."""

    id: str
    approaches: int
    green_phases: int

    @property
    def controlled(self) -> bool:
        return self.approaches >= MIN_APPROACHES and self.green_phases >= MIN_GREEN_PHASES

    @property
    def reason(self) -> str:
        if self.controlled:
            return f"intersection: {self.approaches} approaches, {self.green_phases} green phases"
        if self.approaches < MIN_APPROACHES:
            return (f"kept fixed-time: {self.approaches} approach(es), "
                    f"a mid-block crossing or a one-way junction")
        return f"kept fixed-time: only {self.green_phases} green phase(s), nothing to choose"

    def as_toml(self) -> dict[str, Any]:
        return {"id": self.id, "approaches": self.approaches, "green_phases": self.green_phases,
                "controlled": self.controlled, "reason": self.reason}


def import_osm(osm: Path, name: str, dest_root: Path, *, vehicle_classes: tuple[str, ...] = ("passenger",),
               lefthand: bool = False, bbox: BBox | None = None,
               vehicles_per_hour: float = 1800.0, seed: int = 42, begin: float = 0.0, end: float = 3600.0,
               force: bool = False) -> Scenario:
    """Build ``dest_root/name`` from an OSM XML extract and return the loaded scenario.

    ``bbox`` is (west, south, east, north) in degrees; the demand uses the first vehicle class.
    Raises RELEDError, leaving nothing behind, on bad input or a net without real signalized
    intersections; an existing folder is replaced only with ``force``.
    """
    osm = Path(osm)
    _check_arguments(name, vehicle_classes, bbox, vehicles_per_hour, begin, end)
    summary = _inspect_osm(osm)
    final = Path(dest_root) / name
    started = time.perf_counter()
    with building_folder(final, replace=force) as tmp:
        options = _netconvert_options(vehicle_classes, lefthand, bbox, seed)
        kept = _kept_roads(vehicle_classes, bbox)
        net = _convert(osm, tmp / f"{name}.net.xml", options, kept)
        lights, min_distance = _read_net(net, vehicle_classes)
        controlled = _controlled_lights(osm, lights, summary, kept)
        routes = tmp / f"{name}.rou.xml"
        base_vph = _make_demand(net, routes, vph=vehicles_per_hour, seed=seed, begin=begin, end=end,
                                min_distance=min_distance, vehicle_class=vehicle_classes[0])
        provenance = _provenance(osm, summary, options, lights, vehicle_classes, bbox, seed)
        scenario = _scenario(name, net, routes, base_vph, controlled=controlled, lights=lights,
                             lefthand=lefthand, begin=begin, end=end, provenance=provenance)
        write_scenario_toml(scenario, tmp)
    log.info("imported %s into %s in %.1f s: %d of %d lights controlled", osm.name, final,
             time.perf_counter() - started, len(controlled), len(lights))
    return load_scenario_folder(final)


def _check_arguments(name: str, vehicle_classes: tuple[str, ...], bbox: BBox | None, vph: float,
                     begin: float, end: float) -> None:
    """Reject bad arguments before any file is touched."""
    if not _NAME.fullmatch(name):
        raise RELEDError(f"bad scenario name {name!r}: use letters, digits, '_', '-' or '.' (no slashes)")
    if not vehicle_classes:
        raise RELEDError("no vehicle class given: pass at least one --vclass (e.g. passenger)")
    for vclass in vehicle_classes:
        if not is_vehicle_class(vclass):
            raise RELEDError(f"unknown vehicle class {vclass!r}: "
                             f"use SUMO classes such as passenger, bus, truck")
    if bbox is not None:
        west, south, east, north = bbox
        if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
            raise RELEDError(f"bad bounding box {bbox}: give west,south,east,north in degrees "
                             f"with west < east and south < north")
    if vph <= 0:
        raise RELEDError(f"vehicles per hour must be > 0, got {vph}")
    if end <= begin:
        raise RELEDError(f"end ({end} s) must be after begin ({begin} s)")


def _inspect_osm(osm: Path) -> OsmSummary:
    """Parse the extract once: refuse missing, non-OSM or corrupt files and extracts without signals."""
    if not osm.is_file():
        raise RELEDError(f"OSM file {osm} does not exist: check the path given to --osm")
    signals = roads = 0
    bounds = None
    try:
        with _open_osm(osm) as fh:
            for element in _osm_elements(osm, fh):
                tags = {(t.get("k"), t.get("v")) for t in element.iter("tag")}
                if element.tag == "node":
                    signals += bool(tags & _SIGNAL_TAGS)
                elif element.tag == "way":
                    roads += any(k == "highway" for k, _ in tags)
                elif element.tag == "bounds":
                    bounds = _bounds(element)
    except (ET.ParseError, EOFError, OSError) as exc:
        raise RELEDError(f"{osm} is not readable OSM XML ({exc}): {_FIX_EXPORT}") from exc
    if roads == 0:
        raise RELEDError(f"no roads in {osm}: the extract has no highway=* ways; pick a bigger bounding box")
    if signals == 0:
        raise RELEDError(f"no traffic signals in {osm}: the extract has no highway=traffic_signals (or "
                         f"crossing=traffic_signals) nodes; pick a bigger bounding box around signalized "
                         f"intersections")
    log.info("%s: %d road ways, %d signal nodes", osm.name, roads, signals)
    return OsmSummary(signals, bounds)


def _open_osm(osm: Path) -> IO[bytes]:
    """Plain or gzip-compressed OSM XML (netconvert reads both)."""
    with osm.open("rb") as fh:
        magic = fh.read(2)
    return gzip.open(osm, "rb") if magic == b"\x1f\x8b" else osm.open("rb")


def _osm_elements(osm: Path, fh: IO[bytes]) -> Iterator[ET.Element]:
    """Top-level elements under <osm>, freed as they go so big extracts stay small in memory."""
    events = ET.iterparse(fh, events=("start", "end"))
    _, root = next(events)
    if root.tag != "osm":
        raise RELEDError(f"{osm} is XML but not OSM XML (root element <{root.tag}>, expected <osm>): "
                         f"{_FIX_EXPORT}")
    depth = 0
    for event, element in events:
        depth += 1 if event == "start" else -1
        if event == "end" and depth == 0:
            yield element
            root.clear()


def _bounds(element: ET.Element) -> BBox | None:
    """(west, south, east, north) of an OSM <bounds> element, None when it is malformed."""
    keys = ("minlon", "minlat", "maxlon", "maxlat")
    try:
        west, south, east, north = (float(element.get(k, "")) for k in keys)
    except ValueError:
        return None
    return west, south, east, north


def _netconvert_options(vehicle_classes: tuple[str, ...], lefthand: bool,
                        bbox: BBox | None, seed: int) -> list[str]:
    """The fixed options plus the per-import ones; recorded verbatim in the provenance."""
    options = [*NETCONVERT_OPTIONS, "--keep-edges.by-vclass", ",".join(vehicle_classes), "--seed", str(seed)]
    if lefthand:
        options.append("--lefthand")
    if bbox is not None:
        options += ["--keep-edges.in-geo-boundary", ",".join(f"{v:.7f}" for v in bbox)]
    return options


def _kept_roads(vehicle_classes: tuple[str, ...], bbox: BBox | None) -> str:
    """Which roads survive the filters, for error messages."""
    area = "inside the bounding box" if bbox is not None else "in the extract"
    return f"roads for --vclass {','.join(vehicle_classes)} {area}"


def _convert(osm: Path, net: Path, options: list[str], kept: str) -> Path:
    """Run netconvert inside the build folder and drop its dated header so the file is reproducible."""
    started = time.perf_counter()
    try:
        run_sumo_command([sumo_binary("netconvert"), "--osm-files", str(osm.resolve()), *options,
                          "--output-file", net.name], f"netconvert of {osm.name}", cwd=net.parent)
    except RELEDError as exc:
        if "No edges loaded" in str(exc) or "No nodes loaded" in str(exc):
            raise RELEDError(f"no {kept} of {osm}: pick a bigger bounding box or other --vclass") from exc
        raise
    _strip_generated_header(net)
    log.info("netconvert %s -> %s in %.1f s", osm.name, net.name, time.perf_counter() - started)
    return net


def _strip_generated_header(path: Path) -> None:
    """SUMO tools write the wall-clock time and absolute temp paths in header comments; remove them.

    Without this two imports with the same seed would differ; the same facts go to the provenance.
    Route files get two (randomTrips.py's, then duarouter's).
    """
    path.write_bytes(_GENERATED_HEADER.sub(b"", path.read_bytes()))


def _read_net(net: Path, vehicle_classes: tuple[str, ...]) -> tuple[list[LightReport], float]:
    """Every traffic light with its approach and green-phase counts, and the trip min distance."""
    sumo_net = sumolib.net.readNet(str(net), withPrograms=True)
    lights = [_light_report(tls, vehicle_classes) for tls in sumo_net.getTrafficLights()]
    (xmin, ymin), (xmax, ymax) = sumo_net.getBBoxXY()
    min_distance = min(MIN_TRIP_DISTANCE_M, math.hypot(xmax - xmin, ymax - ymin) / 2)
    return sorted(lights, key=lambda light: light.id), min_distance


def _light_report(tls: sumolib.net.TLS, vehicle_classes: tuple[str, ...]) -> LightReport:
    """Approaches: distinct incoming edges of the light's links that the kept vehicles may use."""
    approaches = {lane_in.getEdge().getID() for lane_in, _, _ in tls.getConnections()
                  if any(lane_in.allows(vc) for vc in vehicle_classes)}
    greens = {phase.state for program in tls.getPrograms().values() for phase in program.getPhases()
              if ("G" in phase.state or "g" in phase.state) and "y" not in phase.state}
    return LightReport(tls.getID(), len(approaches), len(greens))


def _controlled_lights(osm: Path, lights: list[LightReport], summary: OsmSummary, kept: str
                       ) -> tuple[str, ...]:
    """IDs of the lights at real intersections, or an error saying why there are none."""
    if not lights:
        raise RELEDError(f"no traffic signals in {osm} after conversion: none of its {summary.signal_nodes} "
                         f"signal nodes is at a junction of the {kept}; "
                         f"pick a bigger bounding box or other --vclass")
    controlled = tuple(light.id for light in lights if light.controlled)
    for light in lights:
        log.info("light %s: %s", light.id, light.reason)
    if not controlled:
        raise RELEDError(f"none of the {len(lights)} traffic lights in {osm} is at a real intersection "
                         f"(>= {MIN_APPROACHES} approaches, >= {MIN_GREEN_PHASES} green phases; these guard "
                         f"mid-block crossings): pick a bigger bounding box")
    return controlled


def _make_demand(net: Path, routes: Path, *, vph: float, seed: int, begin: float, end: float,
                 min_distance: float, vehicle_class: str) -> float:
    """Random fringe-to-fringe trips, routed; returns the vehicles/hour kept, failing if none route."""
    started = time.perf_counter()
    generate_random_trips(net, routes, vehicles_per_hour=vph, begin=begin, end=end, seed=seed,
                          fringe_factor=FRINGE_FACTOR, min_distance=min_distance, vehicle_class=vehicle_class)
    _strip_generated_header(routes)
    measured = measure_vehicles_per_hour([routes], begin, end)
    if measured <= 0:
        raise RELEDError(f"no routable trips on {net.name}: the kept roads do not connect; "
                         f"pick a bigger bounding box or other --vclass")
    log.info("demand %s: %.0f veh/h in %.1f s", routes.name, measured, time.perf_counter() - started)
    return measured


def _provenance(osm: Path, summary: OsmSummary, options: list[str], lights: list[LightReport],
                vehicle_classes: tuple[str, ...], bbox: BBox | None,
                seed: int) -> dict[str, Any]:
    """Everything needed to redo the import and to honour the ODbL."""
    provenance: dict[str, Any] = {
        "source": osm.name, "source_sha256": sha256_file(osm), "licence": LICENCE, "attribution": ATTRIBUTION,
        "importer": "reled scenario import (trainer.scenarios.osm_import)",
        "netconvert_options": options, "seed": seed, "sumo_version": _sumo_version(),
        "imported_on": dt.datetime.now(dt.UTC).date().isoformat(),
        "bbox": list(bbox) if bbox is not None else "whole extract",
        "vehicle_classes": list(vehicle_classes), "osm_signal_nodes": summary.signal_nodes,
        "lights_total": len(lights), "lights_controlled": sum(light.controlled for light in lights),
        "controlled_rule": f">= {MIN_APPROACHES} approaches (incoming edges) and "
                           f">= {MIN_GREEN_PHASES} distinct green phases",
        "lights": [light.as_toml() for light in lights],
    }
    if summary.bounds is not None:
        provenance["extract_bounds"] = list(summary.bounds)
    return provenance


def _sumo_version() -> str:
    """The netconvert that actually ran, e.g. '1.28.0'."""
    first = run_sumo_command([sumo_binary("netconvert"), "--version"], "netconvert --version").splitlines()[0]
    return first.rsplit(" ", 1)[-1]


def _scenario(name: str, net: Path, routes: Path, base: float, *, controlled: tuple[str, ...],
              lights: list[LightReport], lefthand: bool, begin: float, end: float,
              provenance: dict[str, Any]) -> Scenario:
    """The scenario with its two demand regimes on one route file (SUMO --scale sets the level)."""
    trips = (f"random trips (randomTrips.py, fringe factor {FRINGE_FACTOR:g}, "
             f"seed {provenance['seed']}), {base:.0f} veh/h")
    return Scenario(
        name=name, kind="imported", net=net, begin=begin, end=end, folder=net.parent,
        demands={
            "moderate": DemandRegime("moderate", (routes,), MODERATE_SCALE, base * MODERATE_SCALE, trips),
            "congested": DemandRegime("congested", (routes,), CONGESTED_SCALE, base * CONGESTED_SCALE,
                                      f"moderate scaled by {CONGESTED_SCALE:g}"),
        },
        controlled=controlled, lefthand=lefthand, provenance=provenance,
        description=f"OpenStreetMap import of {provenance['source']}: {len(controlled)} of {len(lights)} "
                    f"traffic lights controlled ({ATTRIBUTION}, {LICENCE})",
    )
