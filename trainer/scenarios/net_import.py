"""Turn a SUMO net (hand-edited, made with netedit, taken from another project) into a RELED scenario.

``reled scenario import --net FILE.net.xml --name NAME`` calls :func:`import_net`. Many cities exist only
as edited SUMO nets, with no OSM extract behind them. The net is kept as it is, its connections and signal
programs being someone's work, unless a traffic side is asked that it does not drive on: then it is rebuilt
through netconvert's plain XML, connections recomputed and signals guessed anew. Lights, demand and
provenance are chosen as for an OSM import (``trainer.scenarios.imported``); see docs/scenarios.md.
"""

from __future__ import annotations

import logging
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError
from trainer.scenarios.demand import CONGESTED_SCALE
from trainer.scenarios.folder import building_folder
from trainer.scenarios.imported import (
    DEFAULT_VEHICLE_CLASSES,
    ImportDemand,
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
from trainer.scenarios.osm_import import ATTRIBUTION, LICENCE
from trainer.sim.sumo_tools import run_sumo_command, sumo_binary

log = logging.getLogger(__name__)

# The rebuild for the other traffic side (docs/scenarios.md): the OSM import's signal options, so the
# programs are guessed as for an OSM net; without --no-turnarounds a rebuilt grid gridlocks under heavy demand.
REBUILD_OPTIONS: tuple[str, ...] = (
    "--tls.guess-signals", "--tls.discard-simple", "--tls.join", "--junctions.join", "--no-turnarounds",
    "--tls.default-type", "static", "--output.street-names",
)
NOTE_PREFIXES = ("PROVENANCE", "LICENSE", "LICENCE", "NOTICE", "COPYING", "ATTRIBUTION")  # files beside the net
MAX_NOTE_BYTES = 65_536
_ODBL_MARKS = ("ODbL", "Open Database License")
_FIX = "edit the net in netedit, or import the area from OpenStreetMap with --osm"


@dataclass(frozen=True)
class NetSummary:
    """What the source net holds, read before anything is built so bad input fails with a clear reason."""

    lefthand: bool
    edges: int
    lights: int


def import_net(net: Path, name: str, dest_root: Path, *, lefthand: bool | None = None,
               vehicles_per_hour: float = 1800.0, congested_scale: float = CONGESTED_SCALE, seed: int = 42,
               begin: float = 0.0, end: float = 3600.0, max_speed_kmh: float | None = None,
               force: bool = False) -> Scenario:
    """Build ``dest_root/name`` from a SUMO net and return the loaded scenario.

    ``lefthand`` None keeps the net's own traffic side; True or False rebuilds the net when it drives on
    the other side. Raises RELEDError, leaving nothing behind, on bad input or a net without real signalized
    intersections; an existing folder is replaced only with ``force``.
    """
    net = Path(net)
    demand = ImportDemand(vehicles_per_hour, congested_scale, seed, begin, end)
    check_arguments(name, demand, max_speed_kmh)
    summary = _inspect_net(net)
    side = summary.lefthand if lefthand is None else lefthand
    final = Path(dest_root) / name
    started = time.perf_counter()
    with building_folder(final, replace=force) as tmp:
        out = tmp / f"{name}.net.xml"
        if side != summary.lefthand:
            rebuild = _rebuild(net, out, side, seed)
        else:
            shutil.copyfile(net, out)
            rebuild = []
        capped = cap_speeds(out, max_speed_kmh) if max_speed_kmh is not None else 0
        lights, min_distance = read_lights(out, DEFAULT_VEHICLE_CLASSES)
        controlled = controlled_lights(lights, str(net), _FIX)
        routes = tmp / f"{name}.rou.xml"
        base_vph = make_demand(out, routes, demand, min_distance=min_distance,
                               vehicle_class=DEFAULT_VEHICLE_CLASSES[0], fix=_FIX)
        provenance = _provenance(net, summary, demand, side, rebuild) | lights_provenance(lights)
        if max_speed_kmh is not None:
            provenance |= {"max_speed_kmh": max_speed_kmh, "edges_capped": capped}
        scenario = imported_scenario(
            name, out, routes, base_vph, demand, controlled=controlled, lefthand=side, provenance=provenance,
            description=f"SUMO net import of {net.name}: {len(controlled)} of {len(lights)} traffic lights "
                        f"controlled (licence: {provenance['licence']})")
        write_scenario_toml(scenario, tmp)
    log.info("imported %s into %s in %.1f s: %d of %d lights controlled", net.name, final,
             time.perf_counter() - started, len(controlled), len(lights))
    return load_scenario_folder(final)


def _inspect_net(net: Path) -> NetSummary:
    """Parse the net once: refuse missing, non-SUMO or corrupt files and nets without roads or lights."""
    if not net.is_file():
        raise RELEDError(f"SUMO net {net} does not exist: check the path given to --net")
    edges = lights = 0
    try:
        events = ET.iterparse(net, events=("start",))
        _, root = next(events)
        if root.tag != "net":
            raise RELEDError(f"{net} is XML but not a SUMO net (root element <{root.tag}>, expected <net>): "
                             f"give a .net.xml written by netconvert or netedit (OSM extracts go to --osm)")
        for _, element in events:
            edges += element.tag == "edge" and element.get("function") != "internal"
            lights += element.tag == "tlLogic"
    except (ET.ParseError, OSError) as exc:
        raise RELEDError(f"{net} is not readable SUMO net XML ({exc}): "
                         f"save it again from netedit or netconvert") from exc
    if edges == 0:
        raise RELEDError(f"no roads in {net}: the net has no edges; {_FIX}")
    if lights == 0:
        raise RELEDError(f"no traffic lights in {net}: a scenario needs signalized intersections; {_FIX}")
    return NetSummary(root.get("lefthand") == "true", edges, lights)


def _rebuild(source: Path, out: Path, lefthand: bool, seed: int) -> list[str]:
    """Plain-XML round trip for the other traffic side; returns the rebuild's netconvert options.

    Nodes, edges and types are kept; connections and signal programs are left out, so netconvert computes
    them for the new side and guesses the signals anew from the nodes' traffic-light types.
    """
    netconvert = sumo_binary("netconvert")
    folder = out.parent
    run_sumo_command([netconvert, "--sumo-net-file", str(source.resolve()), "--plain-output-prefix", "plain"],
                     f"netconvert plain output of {source.name}", cwd=folder)
    options = [*REBUILD_OPTIONS, "--seed", str(seed), *(["--lefthand"] if lefthand else [])]
    inputs = ["--node-files", "plain.nod.xml", "--edge-files", "plain.edg.xml"]
    if (folder / "plain.typ.xml").is_file():
        inputs += ["--type-files", "plain.typ.xml"]
    try:
        run_sumo_command([netconvert, *inputs, *options, "--output-file", out.name],
                         f"netconvert rebuild of {source.name} for {'left' if lefthand else 'right'}-hand traffic",
                         cwd=folder)
    finally:
        for plain in folder.glob("plain.*"):
            plain.unlink()
    strip_generated_header(out)
    return options


def _provenance(net: Path, summary: NetSummary, demand: ImportDemand, lefthand: bool,
                rebuild: list[str]) -> dict[str, Any]:
    """Where the net came from, with the licence and attribution found next to it."""
    notes = _source_notes(net)
    provenance: dict[str, Any] = {
        **common_provenance(net, demand, "reled scenario import --net (trainer.scenarios.net_import)"),
        "source_lefthand": summary.lefthand, "source_lights": summary.lights,
        "rebuilt": f"for {'left' if lefthand else 'right'}-hand traffic" if rebuild else "no: the net as given",
    }
    if rebuild:
        provenance["netconvert_options"] = rebuild
    text = " ".join(notes.values())
    if any(mark in text for mark in _ODBL_MARKS):
        provenance["licence"] = LICENCE
        if "OpenStreetMap" in text:
            provenance["attribution"] = ATTRIBUTION
    else:
        provenance["licence"] = "see source_notes" if notes else "unknown"
    if notes:
        provenance["source_notes"] = notes
    else:
        log.warning("no PROVENANCE or licence file next to %s: record the net's licence in scenario.toml", net)
    return provenance


def _source_notes(net: Path) -> dict[str, str]:
    """PROVENANCE, LICENSE, NOTICE... files beside the net, by name: their text travels with the scenario."""
    return {path.name: path.read_text(encoding="utf-8", errors="replace") for path in sorted(net.parent.iterdir())
            if path.name.upper().startswith(NOTE_PREFIXES) and path.is_file()
            and path.stat().st_size <= MAX_NOTE_BYTES}
