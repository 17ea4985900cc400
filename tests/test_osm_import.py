"""OSM import: the real Orlando and Hong Kong extracts, a hand-written crossroads, and one-line errors."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import sumolib

from edge_runtime.errors import RELEDError
from trainer.scenarios.demand import CONGESTED_SCALE
from trainer.scenarios.model import SCENARIO_FILE, Scenario, load_scenario_folder, scenario_to_toml
from trainer.scenarios.osm_import import ATTRIBUTION, LICENCE, NETCONVERT_OPTIONS, import_osm
from trainer.sim.sumo_tools import sumo_binary

SHARED = Path(os.environ.get("RELED_SHARED", Path(__file__).resolve().parents[2] / "shared"))
ORLANDO = SHARED / "data" / "osm" / "orlando" / "orlando_ucf.osm"
HONG_KONG = SHARED / "data" / "osm" / "hong_kong" / "hk_yaumatei.osm"
MAX_TELEPORTS = 5

LAT, LON, ARM = 28.6, -81.2, 0.004  # hand-written extracts: arms of about 400 m
DEG_PER_M = 1 / 111_000  # degrees of latitude per metre, near enough
SIGNAL = {"highway": "traffic_signals"}
ROAD = {"highway": "secondary", "name": "Test Road"}
Nodes = dict[int, tuple[float, float, dict[str, str]]]
Ways = list[tuple[list[int], dict[str, str]]]


def real_extract(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"real OSM extract {path} is missing: set RELED_SHARED to the shared data folder")
    return path


def write_osm(path: Path, nodes: Nodes, ways: Ways) -> Path:
    """A minimal OSM XML 0.6 file, like an API download of a few roads."""
    root = ET.Element("osm", version="0.6", generator="reled-tests")
    for node_id, (lat, lon, tags) in nodes.items():
        node = ET.SubElement(root, "node", id=str(node_id), lat=str(lat), lon=str(lon), version="1")
        for key, value in tags.items():
            ET.SubElement(node, "tag", k=key, v=value)
    for way_id, (refs, tags) in enumerate(ways, start=100):
        way = ET.SubElement(root, "way", id=str(way_id), version="1")
        for ref in refs:
            ET.SubElement(way, "nd", ref=str(ref))
        for key, value in tags.items():
            ET.SubElement(way, "tag", k=key, v=value)
    ET.ElementTree(root).write(path, encoding="UTF-8", xml_declaration=True)
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def crossroads(path: Path, *, signal: bool = True) -> Path:
    """Two two-way roads crossing at node 1, signalized when asked."""
    nodes: Nodes = {1: (LAT, LON, SIGNAL if signal else {}), 2: (LAT, LON - ARM, {}),
                    3: (LAT, LON + ARM, {}), 4: (LAT - ARM, LON, {}), 5: (LAT + ARM, LON, {})}
    return write_osm(path, nodes, [([2, 1, 3], ROAD), ([4, 1, 5], ROAD)])


def signals_beside_other_ways(path: Path) -> Path:
    """Three signals whose light depends on ways cars may not use: a crossroads signalled on its approaches,
    8 m before the junction; on the east arm a busway junction, signalled on the road's approaches; on the
    west arm a footway crossing with signals. Positions in metres east and north of the crossroads."""
    lat_m, lon_m = DEG_PER_M, DEG_PER_M / math.cos(math.radians(LAT))
    metres = {1: (0, 0), 10: (-600, 0), 11: (600, 0), 12: (0, -400), 13: (0, 400),  # crossroads and arm ends
              20: (-8, 0), 21: (8, 0), 22: (0, -8), 23: (0, 8),  # its approach signals
              2: (300, 0), 24: (290, 0), 25: (310, 0), 50: (300, 300),  # busway junction, its approach signals
              3: (-300, 0), 60: (-300, 20), 61: (-300, -20)}  # signalized footway crossing
    signals = {20, 21, 22, 23, 24, 25, 3}
    nodes: Nodes = {n: (LAT + y * lat_m, LON + x * lon_m, SIGNAL if n in signals else {})
                    for n, (x, y) in metres.items()}
    ways: Ways = [([10, 3, 20, 1, 21, 24, 2, 25, 11], ROAD), ([12, 22, 1, 23, 13], ROAD),
                  ([2, 50], {"highway": "busway"}), ([60, 3, 61], {"highway": "footway", "footway": "crossing"})]
    return write_osm(path, nodes, ways)


def run_hour(scenario: Scenario, regime: str, out: Path) -> dict[str, int]:
    """Run the regime with the net's own fixed-time programs; SUMO's statistics as numbers."""
    demand = scenario.demand(regime)
    stats = out / f"{scenario.name}.{regime}.stats.xml"
    subprocess.run([sumo_binary("sumo"), "-n", str(scenario.net), "-r", ",".join(map(str, demand.routes)),
                    "--scale", str(demand.scale), "-b", str(scenario.begin), "-e", str(scenario.end),
                    "--no-step-log", "--duration-log.statistics", "--statistic-output", str(stats)],
                   check=True, capture_output=True)
    root = ET.parse(stats).getroot()
    return {"loaded": int(root.find("vehicles").get("loaded")),
            "teleports": int(root.find("teleports").get("total")),
            "arrived": int(root.find("vehicleTripStatistics").get("count"))}


def light_shape(net: sumolib.net.Net, tls_id: str) -> tuple[int, int]:
    """(approaches, distinct green phases) read straight from the net, independently of the importer."""
    tls = net.getTLS(tls_id)
    approaches = {lane_in.getEdge().getID() for lane_in, _, _ in tls.getConnections()}
    greens = {p.state for prog in tls.getPrograms().values() for p in prog.getPhases()
              if ("G" in p.state or "g" in p.state) and "y" not in p.state}
    return len(approaches), len(greens)


def net_is_lefthand(net: Path) -> bool:
    """The <net lefthand="true"> flag that makes SUMO drive on the left (sumolib does not expose it)."""
    _, root = next(ET.iterparse(net, events=("start",)))
    return root.get("lefthand") == "true"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_left(dest_root: Path) -> None:
    leftovers = list(dest_root.iterdir()) if dest_root.exists() else []
    assert leftovers == [], f"import left {leftovers} behind"


@pytest.fixture(scope="module")
def orlando(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return import_osm(real_extract(ORLANDO), "orlando", tmp_path_factory.mktemp("osm"))


@pytest.mark.slow
def test_orlando_controls_at_least_ten_real_intersections(orlando: Scenario) -> None:
    assert orlando.kind == "imported" and orlando.controlled is not None
    assert len(orlando.controlled) >= 10
    net = sumolib.net.readNet(str(orlando.net), withPrograms=True)
    for tls_id in orlando.controlled:
        approaches, greens = light_shape(net, tls_id)
        assert approaches >= 2 and greens >= 2, tls_id
    lights = orlando.provenance["lights"]
    assert orlando.provenance["lights_total"] == len(lights) == len(net.getTrafficLights())
    assert [x["id"] for x in lights if x["controlled"]] == list(orlando.controlled)
    assert all(x["crossing"] for x in lights if x["controlled"])
    # Orlando's extras are mid-block crossings: their two approaches are the two directions of one road
    assert all(not x["crossing"] and x["approaches"] <= 2 for x in lights if not x["controlled"])


@pytest.mark.slow
def test_orlando_provenance_and_round_trip(orlando: Scenario) -> None:
    assert orlando.folder is not None
    prov = orlando.provenance
    assert prov["licence"] == LICENCE == orlando.licence and prov["attribution"] == ATTRIBUTION
    assert prov["source"] == ORLANDO.name and prov["source_sha256"] == sha256(ORLANDO)
    assert "--tls.guess-signals" in prov["netconvert_options"] and prov["seed"] == 42
    assert "--keep-edges.by-vclass" not in prov["netconvert_options"]  # the filter is the second pass
    assert prov["netconvert_filter_options"][-4:] == ["--keep-edges.by-vclass", "passenger", "--seed", "42"]
    assert prov["vehicle_classes"] == ["passenger"] and prov["bbox"] == "whole extract"
    assert prov["sumo_version"].startswith("1.") and prov["imported_on"]
    assert sorted(p.name for p in orlando.folder.iterdir()) == ["orlando.net.xml", "orlando.rou.xml",
                                                                 SCENARIO_FILE]
    assert load_scenario_folder(orlando.folder) == orlando
    on_disk = tomllib.loads((orlando.folder / SCENARIO_FILE).read_text())
    assert scenario_to_toml(orlando) == on_disk
    moderate, congested = orlando.demand("moderate"), orlando.demand("congested")
    assert moderate.routes == congested.routes == (orlando.folder / "orlando.rou.xml",)
    assert moderate.vehicles_per_hour == pytest.approx(1800, rel=0.05)
    assert congested.scale == CONGESTED_SCALE
    assert congested.vehicles_per_hour == pytest.approx(moderate.vehicles_per_hour * CONGESTED_SCALE)


@pytest.mark.slow
def test_orlando_import_is_deterministic_for_a_seed(orlando: Scenario, tmp_path: Path) -> None:
    again = import_osm(ORLANDO, "orlando", tmp_path / "again")
    other_seed = import_osm(ORLANDO, "orlando", tmp_path / "other", seed=7)
    assert again.net.read_bytes() == orlando.net.read_bytes()
    routes = [s.demand("moderate").routes[0].read_bytes() for s in (orlando, again, other_seed)]
    assert routes[0] == routes[1] != routes[2]


@pytest.mark.slow
def test_orlando_moderate_hour_has_no_teleport_storm(orlando: Scenario, tmp_path: Path) -> None:
    stats = run_hour(orlando, "moderate", tmp_path)
    assert stats["teleports"] <= MAX_TELEPORTS, stats
    assert stats["arrived"] >= 0.8 * stats["loaded"], stats


@pytest.mark.slow
def test_orlando_bounding_box_keeps_part_of_the_lights(orlando: Scenario, tmp_path: Path) -> None:
    west_half = (-81.2076, 28.5906, -81.1969, 28.6119)
    part = import_osm(ORLANDO, "orlando_west", tmp_path, bbox=west_half)
    assert part.controlled is not None and orlando.controlled is not None
    assert 0 < len(part.controlled) < len(orlando.controlled)
    assert set(part.controlled) <= set(orlando.controlled)
    assert part.provenance["bbox"] == list(west_half)
    assert "--keep-edges.in-geo-boundary" in part.provenance["netconvert_options"]


@pytest.mark.slow
def test_hong_kong_is_a_runnable_lefthand_single_intersection(tmp_path: Path) -> None:
    hk = import_osm(real_extract(HONG_KONG), "hong_kong", tmp_path / "scenarios", lefthand=True)
    assert hk.controlled is not None and len(hk.controlled) == 1
    assert hk.lefthand and "--lefthand" in hk.provenance["netconvert_options"]
    assert load_scenario_folder(hk.folder).lefthand
    assert net_is_lefthand(hk.net)
    stats = run_hour(hk, "moderate", tmp_path)
    assert stats["teleports"] <= MAX_TELEPORTS, stats
    assert stats["arrived"] >= 0.8 * stats["loaded"], stats


def test_hand_written_crossroads_imports_gzipped(tmp_path: Path) -> None:
    plain = crossroads(tmp_path / "cross.osm")
    packed = tmp_path / "cross.osm.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    scenario = import_osm(packed, "cross", tmp_path / "scenarios", vehicles_per_hour=600)
    assert scenario.controlled == ("1",)
    assert scenario.provenance["lights"][0]["approaches"] == 4
    assert scenario.demand("moderate").vehicles_per_hour == pytest.approx(600, rel=0.05)
    assert run_hour(scenario, "moderate", tmp_path)["teleports"] == 0


def test_lights_at_other_ways_survive_the_vehicle_class_filter(tmp_path: Path) -> None:
    osm = signals_beside_other_ways(tmp_path / "beside.osm")
    scenario = import_osm(osm, "beside", tmp_path / "scenarios", vehicles_per_hour=600)
    net = sumolib.net.readNet(str(scenario.net), withPrograms=True)
    assert all(lane.allows("passenger") for edge in net.getEdges() for lane in edge.getLanes())  # no bus/footway
    lights = {x["id"]: x for x in scenario.provenance["lights"]}
    assert len(lights) == len(net.getTrafficLights()) == 3
    [crossroads] = scenario.controlled
    assert lights[crossroads]["approaches"] == 4 and lights[crossroads]["green_phases"] >= 2
    # the busway junction and the footway crossing stay as fixed-time lights on the road: cars stop there
    assert [x["approaches"] for x in lights.values() if not x["controlled"]] == [2, 2]
    assert run_hour(scenario, "moderate", tmp_path)["teleports"] == 0
    # filtering while reading the extract, as imports did before, loses both
    old = tmp_path / "old.net.xml"
    subprocess.run([sumo_binary("netconvert"), "--osm-files", str(osm), *NETCONVERT_OPTIONS, "--remove-edges.isolated",
                    "--keep-edges.components", "1", "--keep-edges.by-vclass", "passenger", "-o", str(old)],
                   check=True, capture_output=True)
    assert len(sumolib.net.readNet(str(old), withPrograms=True).getTrafficLights()) == 1


BAD_INPUTS = {
    "missing": ("does not exist", lambda p: p / "nowhere.osm"),
    "not xml": ("not readable OSM XML", lambda p: write_text(p / "notes.osm", "this is not XML at all\n")),
    "not osm": ("not OSM XML", lambda p: write_text(p / "page.osm", "<html><body>login</body></html>")),
    "truncated": ("not readable OSM XML",
                  lambda p: write_text(p / "cut.osm", crossroads(p / "c.osm").read_text()[:300])),
    "no signals": ("no traffic signals", lambda p: crossroads(p / "unsignalized.osm", signal=False)),
    "signal on a straight road": ("after conversion", lambda p: write_osm(
        p / "straight.osm", {1: (LAT, LON, SIGNAL), 2: (LAT, LON - ARM, {}), 3: (LAT, LON + ARM, {})},
        [([2, 1, 3], ROAD)])),
    "only a one-way tee": ("real intersection", lambda p: write_osm(
        p / "tee.osm", {1: (LAT, LON, SIGNAL), 2: (LAT, LON - ARM, {}), 3: (LAT, LON + ARM, {}),
                        5: (LAT + ARM, LON, {})},
        [([2, 1, 3], ROAD), ([1, 5], {**ROAD, "oneway": "yes"})])),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    expected, make = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    osm = make(tmp_path / "in")
    dest_root = tmp_path / "scenarios"
    with pytest.raises(RELEDError, match=expected) as info:
        import_osm(osm, "bad", dest_root)
    assert "\n" not in str(info.value)
    assert_nothing_left(dest_root)


@pytest.mark.parametrize("kwargs", [{"name": "../escape"}, {"bbox": (10.0, 50.0, 9.0, 51.0)},
                                    {"vehicle_classes": ("hovercraft",)}, {"vehicles_per_hour": 0.0}])
def test_bad_arguments_are_refused_before_any_work(kwargs: dict[str, Any], tmp_path: Path) -> None:
    osm = crossroads(tmp_path / "cross.osm")
    args = {"name": "cross", **kwargs}
    with pytest.raises(RELEDError):
        import_osm(osm, args.pop("name"), tmp_path / "scenarios", **args)
    assert_nothing_left(tmp_path / "scenarios")


def test_bounding_box_without_roads_fails_clearly(tmp_path: Path) -> None:
    osm = crossroads(tmp_path / "cross.osm")
    with pytest.raises(RELEDError, match="no roads for --vclass passenger inside the bounding box"):
        import_osm(osm, "cross", tmp_path / "scenarios", bbox=(0.0, 0.0, 0.001, 0.001))
    assert_nothing_left(tmp_path / "scenarios")


def test_existing_folder_needs_force(tmp_path: Path) -> None:
    osm = crossroads(tmp_path / "cross.osm")
    dest_root = tmp_path / "scenarios"
    first = import_osm(osm, "cross", dest_root, vehicles_per_hour=600)
    with pytest.raises(RELEDError, match="already exists"):
        import_osm(osm, "cross", dest_root, vehicles_per_hour=600, seed=1)
    assert load_scenario_folder(dest_root / "cross") == first
    rebuilt = import_osm(osm, "cross", dest_root, vehicles_per_hour=600, seed=1, force=True)
    assert rebuilt.provenance["seed"] == 1
    assert sorted(p.name for p in dest_root.iterdir()) == ["cross"]
