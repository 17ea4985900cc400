"""Find scenarios by name: synthetic grids, the RESCO nets inside sumo-rl, and imported ones."""

from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.errors import RELEDError
from trainer.scenarios import resco, synthetic
from trainer.scenarios.model import SCENARIO_FILE, Scenario, load_scenario_folder


def reled_home() -> Path:
    """Root of RELED's user data (``$RELED_HOME``, default ``~/.reled``)."""
    return Path(os.environ.get("RELED_HOME", Path.home() / ".reled"))


def scenarios_home() -> Path:
    """Where ``reled scenario import`` puts scenarios."""
    return reled_home() / "scenarios"


def imported_names() -> list[str]:
    home = scenarios_home()
    return sorted(p.name for p in home.iterdir() if (p / SCENARIO_FILE).is_file()) if home.is_dir() else []


def list_scenarios() -> list[tuple[str, str]]:
    """(name, source) for every scenario known without building anything."""
    rows = [(name, "synthetic") for name in synthetic.GRIDS]
    rows += [(name, "resco") for name in resco.available()]
    rows += [(name, "imported") for name in imported_names()]
    return rows


def scenario_identity(name: str) -> str:
    """One identity per scenario however it was named, so a run trained on a folder is recognised wherever it
    is used: a synthetic, RESCO or imported name stays a name (an imported folder given by path becomes its
    name); any other folder becomes its absolute path. What is not a scenario is returned unchanged."""
    imported = Path(name).name == name and (scenarios_home() / name / SCENARIO_FILE).is_file()  # a name, not a path
    if name in synthetic.GRIDS or name in resco.RESCO_NETS or imported:
        return name
    path = Path(name).expanduser()
    if not (path / SCENARIO_FILE).is_file():
        return name
    folder = path.resolve()
    return folder.name if folder.parent == scenarios_home().resolve() else str(folder)


def get_scenario(name: str) -> Scenario:
    """Resolve a name (or a path to a scenario folder); synthetic grids are built on first use."""
    if name in synthetic.GRIDS:
        return synthetic.grid_scenario(name, reled_home() / "cache" / "synthetic")
    if name in resco.RESCO_NETS:
        return resco.resco_scenario(name)
    folder = scenarios_home() / name
    if (folder / SCENARIO_FILE).is_file():
        return load_scenario_folder(folder)
    path = Path(name)
    if (path / SCENARIO_FILE).is_file():
        return load_scenario_folder(path)
    known = ", ".join(n for n, _ in list_scenarios())
    raise RELEDError(f"unknown scenario {name!r}: run `reled scenarios` (known: {known}) "
                     f"or import one with `reled scenario import --osm FILE --name {name}`")
