"""The replay sensor's file: one light's per-phase detector readings at each decision, one ``.npz`` per light.

`reled record` (the trainer: it needs SUMO) writes them from a simulated episode; a controller's replay sensor
(``edge_runtime.device.adapters.ReplaySensor``), `reled-edge install --recording` and `reled-edge fleet up
--recordings` read them. Only ``per_phase`` [T, phases, 3] (queued, approaching, longest wait) is required, so
older and synthetic files still play; ``green_phases`` names the light's program, and a device whose program
differs refuses the file. The rest says where it came from (``light``, ``t``, ``scenario``, ``demand``,
``controller``, ``seed``, ``decision_seconds``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_path

RECORDING_FORMAT = "reled-recording/1"


def recording_name(light: str) -> str:
    """The file a light's recording goes in (SUMO ids may hold characters a file name should not)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", light) + ".npz"


@dataclass(frozen=True)
class Recording:
    per_phase: np.ndarray  # [T, phases, 3] float32
    green_phases: tuple[str, ...]  # () when the file does not say (synthetic recordings)


def read_recording(path: Path) -> Recording:
    """A recording, or a one-line error naming the file."""
    try:
        with np.load(path) as data:
            per_phase = np.asarray(data["per_phase"], dtype=np.float32)
            greens = tuple(str(g) for g in data["green_phases"]) if "green_phases" in data else ()
    except FileNotFoundError as exc:
        raise RELEDError(f"replay file {path} does not exist") from exc
    except (KeyError, ValueError, OSError) as exc:
        raise RELEDError(f"{path} is not a replay recording (an .npz with per_phase [T, phases, 3])") from exc
    return Recording(per_phase, greens)


def write_recording(path: Path, light: str, green_phases: list[str] | tuple[str, ...], per_phase: np.ndarray,
                    **provenance: Any) -> None:
    """Write one light's recording atomically (``provenance``: scalars saying how it was made)."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, per_phase=np.asarray(per_phase, dtype=np.float32), green_phases=np.array(green_phases),
                 light=np.array(light), format=np.array(RECORDING_FORMAT),
                 **{key: np.asarray(value) for key, value in provenance.items()})
