"""RESCO delay from tripinfo, checked against an independent second-by-second computation."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from trainer.env import TrafficSignalEnv
from trainer.scenarios import get_scenario
from trainer.sim.metrics import read_episode_metrics


def scheduled_departures(scenario, end: float) -> dict[str, float]:
    routes = scenario.demand("moderate").routes
    return {el.get("id"): float(el.get("depart")) for path in routes
            for el in ET.parse(path).getroot() if el.tag in ("vehicle", "trip") and float(el.get("depart")) <= end}


@pytest.mark.parametrize("hold_phase", [None, 0])
def test_delay_matches_an_independent_integration(hold_phase):
    """Integrate time loss (1 - v/v_allowed) every second and insertion delays from the route file.

    Holding one phase for the whole run starves half the approaches so that vehicles are never
    inserted: the case where RESCO's charge-until-the-end rule matters.
    """
    scenario = get_scenario("grid2x2")
    end_offset = 900.0 if hold_phase is None else 1800.0
    env = TrafficSignalEnv(scenario="grid2x2", resolved=scenario, episode_seconds=end_offset,
                           fixed_time=hold_phase is None, time_to_teleport=-1,
                           timing=None if hold_phase is None else scenario.timing.__class__(max_green=10_000))
    env.reset(seed=7)
    api = env.api
    loss: dict[str, float] = {}
    departed: dict[str, float] = {}
    step_to = env.sim.step_to

    def integrating_step_to(time: float) -> None:
        while api.simulation.getTime() < time:
            step_to(api.simulation.getTime() + 1.0)
            now = api.simulation.getTime()
            for vid in api.simulation.getDepartedIDList():
                departed[vid] = now - 1.0
            for vid in api.vehicle.getIDList():
                vmax = min(api.vehicle.getAllowedSpeed(vid), api.vehicle.getMaxSpeed(vid))
                loss[vid] = loss.get(vid, 0.0) + (vmax - api.vehicle.getSpeed(vid)) / vmax

    env.sim.step_to = integrating_step_to
    while env.agents:
        env.step({} if hold_phase is None else dict.fromkeys(env.agents, hold_phase))
    end = scenario.begin + end_offset
    schedule = scheduled_departures(scenario, end)
    depart_delay = sum(departed[v] - schedule[v] if v in departed else end - schedule[v] for v in schedule)
    independent = (sum(loss.values()) + depart_delay) / len(schedule)

    metrics = env.last_metrics
    env.close()
    assert metrics.vehicles == len(schedule)
    assert metrics.never_inserted == len(schedule) - len(departed)
    if hold_phase is not None:
        assert metrics.never_inserted >= 10, "holding one phase must block insertions"
    assert metrics.avg_delay == pytest.approx(independent, rel=0.03)


def test_unfinished_output_is_reported(tmp_path):
    (tmp_path / "t.xml").write_text("<tripinfos><tripinfo id='a' depart='0' timeLoss='1'")
    (tmp_path / "s.xml").write_text("<statistics><teleports total='0'/></statistics>")
    with pytest.raises(Exception, match="incomplete"):
        read_episode_metrics(tmp_path / "t.xml", tmp_path / "s.xml")


def test_metrics_by_hand(tmp_path):
    (tmp_path / "t.xml").write_text("""<tripinfos>
      <tripinfo id="a" depart="0" departDelay="2" arrival="50" duration="50" waitingTime="10" timeLoss="20"/>
      <tripinfo id="b" depart="10" departDelay="0" arrival="-1" duration="90" waitingTime="30" timeLoss="40"/>
      <tripinfo id="c" depart="-1" departDelay="60" arrival="-1" duration="0" waitingTime="0" timeLoss="0"/>
    </tripinfos>""")
    (tmp_path / "s.xml").write_text('<statistics><teleports total="3"/></statistics>')
    m = read_episode_metrics(tmp_path / "t.xml", tmp_path / "s.xml")
    assert m.vehicles == 3 and m.throughput == 1 and m.never_inserted == 1 and m.teleports == 3
    assert m.avg_delay == pytest.approx((20 + 2 + 40 + 0 + 0 + 60) / 3)
    assert m.avg_travel_time == pytest.approx(70) and m.avg_waiting_time == pytest.approx(20)
