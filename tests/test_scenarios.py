"""Scenario registry: synthetic grids, RESCO nets read in place, TOML round trip, clear errors."""

from __future__ import annotations

import shutil

import pytest

from edge_runtime.errors import RELEDError
from trainer.scenarios import get_scenario, list_scenarios, scenario_identity, scenarios_home
from trainer.scenarios.demand import count_vehicles
from trainer.scenarios.model import load_scenario_folder, write_scenario_toml
from trainer.scenarios.resco import RESCO_NETS


def test_every_resco_net_is_listed_with_its_time_window():
    names = {n for n, src in list_scenarios() if src == "resco"}
    assert names == set(RESCO_NETS)
    cologne = get_scenario("cologne8")
    assert (cologne.begin, cologne.end) == (25200, 28800)
    ingolstadt = get_scenario("ingolstadt21")
    assert (ingolstadt.begin, ingolstadt.end) == (57600, 61200)
    assert "site-packages" in str(cologne.net), "RESCO nets are read from the installed sumo-rl"


def test_resco_moderate_is_the_original_route_file():
    s = get_scenario("cologne3")
    assert s.demand("moderate").scale == 1.0
    assert s.demand("congested").scale > 1.0
    assert s.demand("moderate").routes == s.demand("congested").routes
    assert s.demand("moderate").vehicles_per_hour == count_vehicles(s.demand("moderate").routes, s.begin, s.end)


def test_synthetic_grid_is_generated_once_and_deterministic(reled_home):
    first = get_scenario("grid2x2")
    net_bytes = first.net.read_bytes()
    again = get_scenario("grid2x2")
    assert again.net.read_bytes() == net_bytes
    assert first.demand("moderate").vehicles_per_hour == pytest.approx(900, rel=0.05)
    assert not [p for p in first.folder.parent.iterdir() if p.name.startswith(".")], "temp folders left"


def test_scenario_toml_round_trip(tmp_path):
    grid = get_scenario("grid2x2")
    write_scenario_toml(grid, grid.folder)
    loaded = load_scenario_folder(grid.folder)
    assert loaded == grid


def test_flows_are_counted(tmp_path):
    routes = tmp_path / "f.rou.xml"
    routes.write_text("""<routes>
        <flow id="a" begin="0" end="3600" vehsPerHour="600" from="x" to="y"/>
        <flow id="b" begin="0" end="1800" number="100" from="x" to="y"/>
        <flow id="c" begin="0" end="3600" period="10" from="x" to="y"/>
        <trip id="t" depart="10" from="x" to="y"/>
    </routes>""")
    assert count_vehicles([routes], 0, 3600) == pytest.approx(600 + 100 + 360 + 1)
    assert count_vehicles([routes], 0, 900) == pytest.approx(150 + 50 + 90 + 1)


def test_unknown_scenario_names_the_fix():
    with pytest.raises(RELEDError, match="run `reled scenarios` "):
        get_scenario("atlantis")


def test_a_scenario_has_one_identity_however_it_is_named(tmp_path, monkeypatch):
    assert scenario_identity("grid2x2") == "grid2x2" and scenario_identity("cologne8") == "cologne8"
    shutil.copytree(get_scenario("grid2x2").folder, tmp_path / "corridor")
    monkeypatch.chdir(tmp_path)
    assert scenario_identity("corridor") == scenario_identity(str(tmp_path / "corridor")) == str(tmp_path / "corridor")
    assert scenario_identity("./corridor/") == str(tmp_path / "corridor")
    imported = scenarios_home() / "corridor_imported"
    shutil.copytree(tmp_path / "corridor", imported)
    try:
        assert scenario_identity(str(imported)) == scenario_identity("corridor_imported") == "corridor_imported"
    finally:
        shutil.rmtree(imported)
    assert scenario_identity("atlantis") == "atlantis"  # not a scenario: left as given, so errors quote it
