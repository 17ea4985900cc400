"""The scenario description shared by every source (synthetic, RESCO, OSM import) and its TOML form."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_write_text, read_toml
from edge_runtime.shield import SignalTiming

SCENARIO_FILE = "scenario.toml"


@dataclass(frozen=True)
class DecisionTiming(SignalTiming):
    """The shield's safety timings plus how often the policy decides; the defaults are RELED's default timing.

    RELED's default timing: 3 s yellow, 2 s all-red, 10 s min green, 60 s max green, a decision every 10 s.
    RESCO's timing differs (no all-red, 7 s min green): ``configs/resco_timing.toml``.
    """

    delta: float = 10.0

    def __post_init__(self) -> None:
        if self.delta <= 0:
            raise RELEDError(f"decision interval must be > 0 s, got {self.delta}")
        try:
            super().__post_init__()
        except ValueError as exc:
            raise RELEDError(f"bad signal timing: {exc}") from exc


@dataclass(frozen=True)
class DemandRegime:
    """A demand level: route files loaded with SUMO's ``--scale``."""

    name: str
    routes: tuple[Path, ...]
    scale: float = 1.0
    vehicles_per_hour: float = 0.0
    description: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # synthetic | resco | imported
    net: Path
    begin: float
    end: float
    demands: dict[str, DemandRegime]
    timing: DecisionTiming = DecisionTiming()
    controlled: tuple[str, ...] | None = None  # None: every light with >= 2 green phases
    lefthand: bool = False
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def licence(self) -> str:
        return str(self.provenance.get("licence", "unknown"))

    def demand(self, name: str) -> DemandRegime:
        if name not in self.demands:
            raise RELEDError(f"unknown demand regime {name!r} for scenario {self.name}: "
                             f"choose one of {', '.join(self.demands)}")
        return self.demands[name]

    def check_files(self) -> None:
        """Fail early, with the path, when a net or route file is missing."""
        for path in [self.net, *(r for d in self.demands.values() for r in d.routes)]:
            if not path.is_file():
                raise RELEDError(f"scenario {self.name}: file {path} is missing; "
                                 f"re-import or regenerate the scenario")


def load_scenario_folder(folder: Path) -> Scenario:
    """Read ``folder/scenario.toml``; paths inside it are relative to the folder."""
    path = folder / SCENARIO_FILE
    if not path.is_file():
        raise RELEDError(f"{folder} is not a scenario folder: {SCENARIO_FILE} is missing")
    data = read_toml(path)
    try:
        demands = {
            name: DemandRegime(name, tuple(folder / r for r in d["routes"]), float(d.get("scale", 1.0)),
                               float(d.get("vehicles_per_hour", 0.0)), d.get("description", ""))
            for name, d in data["demand"].items()
        }
        controlled = data.get("controlled")
        return Scenario(
            name=data["name"], kind=data.get("kind", "imported"), net=folder / data["net"],
            begin=float(data.get("begin", 0)), end=float(data["end"]), demands=demands,
            timing=DecisionTiming(**data.get("timing", {})),
            controlled=tuple(controlled) if controlled is not None else None,
            lefthand=bool(data.get("lefthand", False)), description=data.get("description", ""),
            provenance=dict(data.get("provenance", {})), folder=folder,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RELEDError(f"{path} is malformed ({type(exc).__name__}: {exc}); re-import the scenario") from exc


def scenario_to_toml(scenario: Scenario) -> dict[str, Any]:
    """The TOML form, with paths made relative to the scenario folder."""
    folder = scenario.folder or scenario.net.parent

    def rel(p: Path) -> str:
        return os.path.relpath(p, folder)

    data: dict[str, Any] = {
        "name": scenario.name, "kind": scenario.kind, "description": scenario.description,
        "net": rel(scenario.net), "begin": scenario.begin, "end": scenario.end,
        "lefthand": scenario.lefthand, "timing": asdict(scenario.timing),
        "demand": {
            d.name: {"routes": [rel(r) for r in d.routes], "scale": d.scale,
                     "vehicles_per_hour": round(d.vehicles_per_hour, 1), "description": d.description}
            for d in scenario.demands.values()
        },
        "provenance": scenario.provenance,
    }
    if scenario.controlled is not None:
        data["controlled"] = list(scenario.controlled)
    return data


def write_scenario_toml(scenario: Scenario, folder: Path) -> None:
    """Write ``scenario.toml`` atomically (temp file, then rename)."""
    atomic_write_text(folder / SCENARIO_FILE, tomli_w.dumps(scenario_to_toml(scenario)))
