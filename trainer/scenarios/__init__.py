"""Scenarios: a SUMO net, its demand regimes and decision timing, with provenance."""

from trainer.scenarios.model import DecisionTiming, DemandRegime, Scenario
from trainer.scenarios.registry import get_scenario, list_scenarios, scenario_identity, scenarios_home

__all__ = ["DecisionTiming", "DemandRegime", "Scenario", "get_scenario", "list_scenarios", "scenario_identity",
           "scenarios_home"]
