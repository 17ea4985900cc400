"""Demonstration store: one folder per run, one .npy file per column, and a JSON manifest.

Columns (one row per agent decision of a kept demonstration): obs [R, F] float32, mask [R, P] bool,
action, reward, subset, round, candidate, agent, step. Plain NumPy files, so the trainer reads them
(memory-mapped) without the LLM stack installed. The folder is written under a temporary name
and renamed at the end: a crashed or interrupted run leaves no half-written store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_size
from edge_runtime.fileio import atomic_folder

FORMAT = "reled-demos/1"
MANIFEST = "manifest.json"
COLUMNS = {"obs": np.float32, "mask": np.bool_, "action": np.int64, "reward": np.float32, "subset": np.int32,
           "round": np.int32, "candidate": np.int32, "agent": np.int32, "step": np.int32}


@dataclass(frozen=True)
class DemoSet:
    folder: Path
    manifest: dict[str, Any]
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["action"])


def check_free(folder: Path, overwrite: bool) -> None:
    """Refuse an existing output folder up front, before any simulation or LLM time is spent."""
    if folder.exists() and not overwrite:
        raise RELEDError(f"{folder} exists: choose another --out or pass --force to replace it")


def write_demos(folder: Path, manifest: dict[str, Any], columns: dict[str, np.ndarray],
                overwrite: bool) -> dict[str, Any]:
    """Write the store; returns the manifest as written."""
    rows = {len(v) for v in columns.values()}
    if set(columns) != set(COLUMNS) or len(rows) != 1:
        raise ValueError(f"demo columns must be {sorted(COLUMNS)} of equal length")
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "feature_size": feature_size(),
                "max_phases": MAX_PHASES, "rows": rows.pop(), "columns": list(COLUMNS), **manifest}
    check_free(folder, overwrite)
    try:
        with atomic_folder(folder) as tmp:
            for name, dtype in COLUMNS.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(columns[name], dtype=dtype))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except OSError as exc:  # a full or read-only disk: the temporary folder is gone, the old store untouched
        raise RELEDError(f"could not write the demonstrations to {folder}: {exc.strerror or exc}; nothing was "
                         "written (free some space or choose another --out)") from exc
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise RELEDError(f"{folder} is not a demonstration folder ({MANIFEST} is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RELEDError(f"{path} is not valid JSON ({exc}); regenerate the demonstrations") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RELEDError(f"{path} is not a RELED demonstration manifest (expected format {FORMAT})")
    return manifest


def load_demos(folder: Path, scenario: str | None = None, agents: list[str] | None = None) -> DemoSet:
    """Columns memory-mapped; refuses demonstrations made for another scenario or observation schema."""
    manifest = read_manifest(folder)
    if (manifest.get("schema_version"), manifest.get("feature_size"), manifest.get("max_phases")) != (
            SCHEMA_VERSION, feature_size(), MAX_PHASES):
        raise RELEDError(f"{folder} holds observations of schema v{manifest.get('schema_version')} "
                         f"({manifest.get('feature_size')} features); this RELED uses v{SCHEMA_VERSION} "
                         f"({feature_size()} features): regenerate the demonstrations")
    if scenario is not None and manifest.get("scenario") != scenario:
        raise RELEDError(f"{folder} holds demonstrations for scenario {manifest.get('scenario')}, not {scenario}")
    if agents is not None and manifest.get("agents") != agents:
        raise RELEDError(f"{folder} was made for lights {manifest.get('agents')}, which differ from "
                         f"this scenario's; regenerate the demonstrations")
    columns = {}
    for name in COLUMNS:
        try:
            columns[name] = np.load(folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise RELEDError(f"{folder}: column {name}.npy is missing or damaged ({exc})") from None
    if {len(c) for c in columns.values()} != {manifest["rows"]}:
        raise RELEDError(f"{folder}: columns do not all have the {manifest['rows']} rows the manifest lists")
    return DemoSet(folder, manifest, columns)
