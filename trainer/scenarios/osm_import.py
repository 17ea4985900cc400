"""Turn an OpenStreetMap extract into a RELED scenario: netconvert, random-trip demand, controlled lights.

``reled scenario import --osm FILE --name NAME`` calls :func:`import_osm`. The folder is built
atomically, byte-for-byte reproducible for a seed, and carries the ODbL attribution the data needs.
See ``docs/osm_import.md`` for the option choices and the measured results on the bundled extracts.
"""

from __future__ import annotations

import gzip
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sumolib.net.lane import is_vehicle_class

from edge_runtime.errors import RELEDError
from trainer.scenarios.demand import CONGESTED_SCALE
from trainer.scenarios.folder import building_folder
from trainer.scenarios.imported import (
    DEFAULT_VEHICLE_CLASSES,
    ImportDemand,
    LightReport,
    cap_speeds,
    check_arguments,
    common_provenance,
    controlled_lights,
    imported_scenario,
    lights_provenance,
    make_demand,
    read_lights,
    strip_generated_header,
)
from trainer.scenarios.model import Scenario, load_scenario_folder, write_scenario_toml
from trainer.sim.sumo_tools import run_sumo_command, sumo_binary

log = logging.getLogger(__name__)

BBox = tuple[float, float, float, float]  # (west, south, east, north) in degrees

LICENCE = "ODbL-1.0"
ATTRIBUTION = "Map data © OpenStreetMap contributors"

# Fixed netconvert options of the first pass, over every road of the extract; every choice is explained in
# docs/osm_import.md.
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
    "--output.street-names",  # street names, for prompts and plots
)
# The second pass, over the built net: only the vehicle classes' roads (--keep-edges.by-vclass, added per import).
# No --tls.discard-simple: a light left on a plain road once its busway, service road or footway is gone still
# stops the cars (a bus gate, a car park exit, a pedestrian crossing); it stays, fixed-time.
FILTER_OPTIONS: tuple[str, ...] = (
    "--geometry.remove",  # nodes where only a removed footway met the road become edge geometry
    "--tls.guess-signals",  # a signal whose footway crossing went is now an approach signal of its junction
    "--tls.join",  # and joins the lights the first pass left a few metres apart
    "--tls.default-type", "static",
    "--no-turnarounds",
    "--remove-edges.isolated",  # drop road fragments joined to nothing
    "--keep-edges.components", "1",  # keep the largest connected road network only: trips stay routable
    "--output.street-names",
)
_SIGNAL_TAGS = {("highway", "traffic_signals"), ("crossing", "traffic_signals")}  # what netconvert reads
_FIX_EXPORT = ("export the area again as OSM XML "
               "(openstreetmap.org Export, or `osmium cat FILE.pbf -o FILE.osm`)")


@dataclass(frozen=True)
class OsmSummary:
    """What the raw extract holds, read before netconvert so bad input fails with a clear reason."""

    signal_nodes: int
    bounds: BBox | None  # from the <bounds> element, when present


def import_osm(osm: Path, name: str, dest_root: Path, *,
               vehicle_classes: tuple[str, ...] = DEFAULT_VEHICLE_CLASSES, lefthand: bool = False,
               bbox: BBox | None = None, vehicles_per_hour: float = 1800.0,
               congested_scale: float = CONGESTED_SCALE, seed: int = 42, begin: float = 0.0, end: float = 3600.0,
               max_speed_kmh: float | None = None, force: bool = False) -> Scenario:
    """Build ``dest_root/name`` from an OSM XML extract and return the loaded scenario.

    ``bbox`` is (west, south, east, north) in degrees; the demand uses the first vehicle class.
    Raises RELEDError, leaving nothing behind, on bad input or a net without real signalized
    intersections; an existing folder is replaced only with ``force``.
    """
    osm = Path(osm)
    demand = ImportDemand(vehicles_per_hour, congested_scale, seed, begin, end)
    check_arguments(name, demand, max_speed_kmh)
    _check_osm_arguments(vehicle_classes, bbox)
    summary = _inspect_osm(osm)
    final = Path(dest_root) / name
    started = time.perf_counter()
    with building_folder(final, replace=force) as tmp:
        options = _netconvert_options(lefthand, bbox, seed)
        filter_options = _filter_options(vehicle_classes, lefthand, seed)
        kept = _kept_roads(vehicle_classes, bbox)
        net = _convert(osm, tmp / f"{name}.net.xml", options, filter_options, kept)
        capped = cap_speeds(net, max_speed_kmh) if max_speed_kmh is not None else 0
        lights, min_distance = read_lights(net, vehicle_classes)
        controlled = controlled_lights(lights, f"{osm} after conversion ({summary.signal_nodes} signal nodes, "
                                               f"{kept})", "pick a bigger bounding box or other --vclass")
        routes = tmp / f"{name}.rou.xml"
        base_vph = make_demand(net, routes, demand, min_distance=min_distance, vehicle_class=vehicle_classes[0],
                               fix="pick a bigger bounding box or other --vclass")
        provenance = _provenance(osm, summary, demand, options, filter_options, lights, vehicle_classes, bbox)
        if max_speed_kmh is not None:
            provenance |= {"max_speed_kmh": max_speed_kmh, "edges_capped": capped}
        scenario = imported_scenario(
            name, net, routes, base_vph, demand, controlled=controlled, lefthand=lefthand, provenance=provenance,
            description=f"OpenStreetMap import of {osm.name}: {len(controlled)} of {len(lights)} traffic lights "
                        f"controlled ({ATTRIBUTION}, {LICENCE})")
        write_scenario_toml(scenario, tmp)
    log.info("imported %s into %s in %.1f s: %d of %d lights controlled", osm.name, final,
             time.perf_counter() - started, len(controlled), len(lights))
    return load_scenario_folder(final)


def _check_osm_arguments(vehicle_classes: tuple[str, ...], bbox: BBox | None) -> None:
    """Reject bad OSM-only arguments before any file is touched."""
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


def _netconvert_options(lefthand: bool, bbox: BBox | None, seed: int) -> list[str]:
    """The first pass (every road, signals guessed and joined) with the per-import options; kept in the provenance."""
    options = [*NETCONVERT_OPTIONS, "--seed", str(seed)]
    if lefthand:
        options.append("--lefthand")
    if bbox is not None:
        options += ["--keep-edges.in-geo-boundary", ",".join(f"{v:.7f}" for v in bbox)]
    return options


def _filter_options(vehicle_classes: tuple[str, ...], lefthand: bool, seed: int) -> list[str]:
    """The second pass: the vehicle-class filter over the built net, which keeps its lights."""
    options = [*FILTER_OPTIONS, "--keep-edges.by-vclass", ",".join(vehicle_classes), "--seed", str(seed)]
    return [*options, "--lefthand"] if lefthand else options


def _kept_roads(vehicle_classes: tuple[str, ...], bbox: BBox | None) -> str:
    """Which roads survive the filters, for error messages."""
    area = "inside the bounding box" if bbox is not None else "in the extract"
    return f"roads for --vclass {','.join(vehicle_classes)} {area}"


def _convert(osm: Path, net: Path, options: list[str], filter_options: list[str], kept: str) -> Path:
    """Run both netconvert passes inside the build folder; drop the dated header so the file is reproducible.

    Signals are guessed and joined on the full road graph first (a footway or busway near a junction must
    not decide whether its light exists), then the second pass keeps the vehicle classes' roads.
    """
    started = time.perf_counter()
    full = net.with_name("all_roads.net.xml")
    netconvert = sumo_binary("netconvert")
    try:
        run_sumo_command([netconvert, "--osm-files", str(osm.resolve()), *options, "--output-file", full.name],
                         f"netconvert of {osm.name}", cwd=net.parent)
        run_sumo_command([netconvert, "--sumo-net-file", full.name, *filter_options, "--output-file", net.name],
                         f"netconvert of {osm.name} (vehicle-class filter)", cwd=net.parent)
    except RELEDError as exc:
        if "No edges loaded" in str(exc) or "No nodes loaded" in str(exc):
            raise RELEDError(f"no {kept} of {osm}: pick a bigger bounding box or other --vclass") from exc
        raise
    finally:
        full.unlink(missing_ok=True)
    strip_generated_header(net)
    log.info("netconvert %s -> %s in %.1f s", osm.name, net.name, time.perf_counter() - started)
    return net


def _provenance(osm: Path, summary: OsmSummary, demand: ImportDemand, options: list[str],
                filter_options: list[str], lights: list[LightReport], vehicle_classes: tuple[str, ...],
                bbox: BBox | None) -> dict[str, Any]:
    """Everything needed to redo the import and to honour the ODbL."""
    provenance: dict[str, Any] = {
        **common_provenance(osm, demand, "reled scenario import --osm (trainer.scenarios.osm_import)"),
        "licence": LICENCE, "attribution": ATTRIBUTION,
        "netconvert_options": options, "netconvert_filter_options": filter_options,
        "bbox": list(bbox) if bbox is not None else "whole extract",
        "vehicle_classes": list(vehicle_classes), "osm_signal_nodes": summary.signal_nodes,
        **lights_provenance(lights),
    }
    if summary.bounds is not None:
        provenance["extract_bounds"] = list(summary.bounds)
    return provenance
