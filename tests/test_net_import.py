"""SUMO-net import: a generated net kept as it is or rebuilt for the other traffic side, Hong Kong, one-line errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import sumolib

from edge_runtime.errors import RELEDError
from trainer.controllers import make_controller
from trainer.env import EnvConfig, TrafficSignalEnv
from trainer.evaluate import evaluate
from trainer.scenarios.model import SCENARIO_FILE, Scenario, load_scenario_folder
from trainer.scenarios.net_import import import_net
from trainer.scenarios.osm_import import ATTRIBUTION, LICENCE
from trainer.sim.metrics import EpisodeMetrics
from trainer.sim.sumo_tools import sumo_binary

SHARED = Path(os.environ.get("RELED_SHARED", Path(__file__).resolve().parents[2] / "shared"))
HONG_KONG = SHARED / "data" / "sumo" / "hong_kong_ymt"
NOTE = "Two crossroads, drawn by hand. Map data © OpenStreetMap contributors, ODbL 1.0.\n"


def generate(net: Path, junctions: str = "traffic_light") -> Path:
    """Two crossroads 200 m apart with arms to the edge of the map (netgenerate), right-hand traffic."""
    subprocess.run([sumo_binary("netgenerate"), "--grid", "--grid.x-number", "2", "--grid.y-number", "1",
                    "--grid.length", "200", "--grid.attach-length", "200", "--default-junction-type", junctions,
                    "--tls.layout", "opposites", "--no-turnarounds", "true", "-o", str(net)],
                   check=True, capture_output=True)
    return net


@pytest.fixture(scope="module")
def two_lights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated net as someone's hand-made SUMO net, with a PROVENANCE file beside it."""
    folder = tmp_path_factory.mktemp("net")
    (folder / "PROVENANCE.md").write_text(NOTE)
    return generate(folder / "two.net.xml")


def net_is_lefthand(net: Path) -> bool:
    _, root = next(ET.iterparse(net, events=("start",)))
    return root.get("lefthand") == "true"


def episode(scenario: Scenario, controller: str, seconds: float | None = 600.0) -> EpisodeMetrics:
    """One episode through RELED's environment, as `reled eval` plays it."""
    [result] = evaluate(scenario, [make_controller(controller)], [0], EnvConfig(episode_seconds=seconds))
    return result.metrics


def test_a_net_is_kept_as_it_is_and_runs(two_lights: Path, tmp_path: Path) -> None:
    scenario = import_net(two_lights, "two", tmp_path / "scenarios", vehicles_per_hour=600)
    assert scenario.kind == "imported" and scenario.controlled == ("A0", "B0") and not scenario.lefthand
    assert scenario.net.read_bytes() == two_lights.read_bytes()  # connections and programs as drawn
    assert sorted(p.name for p in scenario.folder.iterdir()) == [SCENARIO_FILE, "two.net.xml", "two.rou.xml"]
    assert load_scenario_folder(scenario.folder) == scenario
    prov = scenario.provenance
    assert prov["source"] == "two.net.xml"
    assert prov["source_sha256"] == hashlib.sha256(two_lights.read_bytes()).hexdigest()
    assert prov["licence"] == LICENCE and prov["attribution"] == ATTRIBUTION
    assert prov["source_notes"] == {"PROVENANCE.md": NOTE} and prov["rebuilt"].startswith("no")
    assert prov["lights_total"] == prov["lights_controlled"] == 2
    moderate, congested = scenario.demand("moderate"), scenario.demand("congested")
    assert moderate.vehicles_per_hour == pytest.approx(600, rel=0.05) and congested.scale == 1.5
    env = TrafficSignalEnv(resolved=scenario)
    assert env.possible_agents == ["A0", "B0"]
    env.close()
    metrics = episode(scenario, "max-pressure")
    assert metrics.vehicles > 50 and metrics.teleports == 0


def test_a_net_is_rebuilt_only_for_the_other_traffic_side(two_lights: Path, tmp_path: Path) -> None:
    left = import_net(two_lights, "two_left", tmp_path, lefthand=True, vehicles_per_hour=600, congested_scale=2.0,
                      max_speed_kmh=30)
    assert left.lefthand and net_is_lefthand(left.net) and not net_is_lefthand(two_lights)
    assert left.provenance["rebuilt"] == "for left-hand traffic"
    assert "--lefthand" in left.provenance["netconvert_options"]
    assert left.controlled == ("A0", "B0")  # the signals guessed anew at both crossroads
    edges = sumolib.net.readNet(str(left.net)).getEdges()
    assert max(edge.getSpeed() for edge in edges) == pytest.approx(30 / 3.6, abs=0.01)
    assert left.provenance["edges_capped"] == len(edges) and left.provenance["max_speed_kmh"] == 30
    assert left.demand("congested").vehicles_per_hour == pytest.approx(2 * left.demand("moderate").vehicles_per_hour)
    assert sorted(p.name for p in left.folder.iterdir()) == [SCENARIO_FILE, "two_left.net.xml", "two_left.rou.xml"]
    assert episode(left, "greedy").teleports == 0
    right = import_net(two_lights, "two_right", tmp_path, lefthand=False, vehicles_per_hour=600)
    assert right.net.read_bytes() == two_lights.read_bytes()  # already right-hand: nothing to rebuild


def test_cli_imports_a_net_and_evaluates_it(assert_one_line_error, reled, two_lights: Path) -> None:
    proc = reled("scenario", "import", "--net", str(two_lights), "--name", "two_cli", "--vehicles-per-hour", "600")
    assert proc.returncode == 0, proc.stderr
    assert "2 of 2 lights controlled, licence ODbL-1.0" in " ".join(proc.stdout.split())
    proc = reled("eval", "--scenario", "two_cli", "--controller", "fixed,greedy,max-pressure", "--seeds", "1",
                 "--episode-seconds", "300")
    assert proc.returncode == 0, proc.stderr
    assert "two_cli / moderate" in proc.stdout and "max-pressure" in proc.stdout
    osm = ("--osm", str(two_lights))
    assert_one_line_error(reled("scenario", "import", "--name", "x"), "exactly one of --osm", "--net")
    assert_one_line_error(reled("scenario", "import", "--name", "x", *osm, "--net", str(two_lights)), "exactly one")
    assert_one_line_error(reled("scenario", "import", "--name", "x", "--net", str(two_lights), "--vclass", "bus"),
                          "--vclass and --bbox apply to --osm")


BAD_NETS = {
    "missing": ("does not exist", lambda p: p / "nowhere.net.xml"),
    "not xml": ("not readable SUMO net XML", lambda p: _write(p / "notes.net.xml", "no XML here\n")),
    "truncated": ("not readable SUMO net XML",
                  lambda p: _write(p / "cut.net.xml", generate(p / "whole.net.xml").read_text()[:3000])),
    "an OSM extract": ("not a SUMO net", lambda p: _write(p / "map.osm", '<osm version="0.6"></osm>')),
    "no lights": ("no traffic lights", lambda p: generate(p / "plain.net.xml", junctions="priority")),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_NETS))
def test_bad_nets_fail_in_one_line_and_leave_nothing(case: str, tmp_path: Path) -> None:
    expected, make = BAD_NETS[case]
    (tmp_path / "in").mkdir()
    with pytest.raises(RELEDError, match=expected) as info:
        import_net(make(tmp_path / "in"), "bad", tmp_path / "scenarios")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "scenarios").exists() or not list((tmp_path / "scenarios").iterdir())


@pytest.mark.slow
def test_hong_kong_net_is_a_lefthand_scenario_with_its_23_lights(tmp_path: Path) -> None:
    source = HONG_KONG / "ymt_lefthand.net.xml"
    if not source.is_file():
        pytest.fail(f"{source} is missing: set RELED_SHARED to the shared data folder")
    hk = import_net(source, "hong_kong", tmp_path / "scenarios", congested_scale=2.0)
    prov = hk.provenance
    assert hk.lefthand and prov["lights_total"] == 23 and prov["source_lights"] == 23
    # 18 real intersections; kept fixed-time: the merge and the mid-block crossing with one approach, two lights
    # with one green phase, and one whose two approaches are the two directions of one road
    assert len(hk.controlled or ()) == prov["lights_controlled"] == 18
    assert prov["licence"] == LICENCE and prov["attribution"] == ATTRIBUTION
    assert "ODbL" in prov["source_notes"]["PROVENANCE.md"]
    assert hk.demand("moderate").vehicles_per_hour == pytest.approx(1800, rel=0.02)
    assert hk.demand("congested").vehicles_per_hour == pytest.approx(3600, rel=0.02)
    env = TrafficSignalEnv(resolved=hk)
    assert env.possible_agents == list(hk.controlled or ())
    env.close()
    for regime in ("moderate", "congested"):
        [result] = evaluate(hk, [make_controller("fixed")], [0], EnvConfig(demand=regime))
        assert result.metrics.teleports <= 5 and result.metrics.throughput >= 0.9 * result.metrics.vehicles, regime
    # the PROVENANCE's left-hand rebuild of the original right-hand net, redone by the importer
    rebuilt = import_net(HONG_KONG / "ymt_original_righthand.net.xml", "hong_kong_rebuilt", tmp_path, lefthand=True)
    body = rebuilt.net.read_bytes()
    assert body[body.index(b"<net "):] == source.read_bytes()[source.read_bytes().index(b"<net "):]
