"""Where a controller reads its detectors and drives its signal heads.

The daemon talks to a :class:`Sensor` and an :class:`Actuator` only. Here: a replay sensor that plays
recorded per-phase detector readings (:mod:`edge_runtime.recordings`: `reled record` writes one per light
from a SUMO run, ``edge_runtime.fleet.local.synthetic_replay`` synthetic ones) and an
actuator that logs every signal state it is told to show. The hardware-in-the-loop adapter ("hil", sensor
and actuator at once) is :mod:`edge_runtime.device.hil`; cabinet I/O (NTCIP, GPIO) plugs in here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.features import PER_PHASE_FEATURES
from edge_runtime.recordings import read_recording
from edge_runtime.shield import SignalState


class Sensor(Protocol):
    def read(self) -> np.ndarray:
        """Per-phase detector readings [n_phases, 3]: queued, approaching, longest wait."""
        ...


class Actuator(Protocol):
    def show(self, t: float, state: SignalState, link_states: str) -> None: ...

    def close(self) -> None: ...


class ReplaySensor:
    """Plays a recording in a loop (a controller on the bench, the CI, the benchmarks)."""

    def __init__(self, path: Path | None, n_phases: int, greens: tuple[str, ...] = ()):
        if path is None:
            raise RELEDError("[sensor] adapter 'replay' needs file = \"recording.npz\"")
        recording = read_recording(path)
        per_phase = recording.per_phase
        if per_phase.ndim != 3 or per_phase.shape[1:] != (n_phases, len(PER_PHASE_FEATURES)) or not len(per_phase):
            raise RELEDError(f"{path}: per_phase has shape {per_phase.shape}; this intersection needs "
                             f"[T, {n_phases}, {len(PER_PHASE_FEATURES)}]")
        if greens and recording.green_phases and recording.green_phases != tuple(greens):
            raise RELEDError(f"{path} was recorded at a light whose green phases are {list(recording.green_phases)}, "
                             f"not this device's {list(greens)}: record this device's light (`reled record --light "
                             "ID`)")
        self.per_phase = per_phase
        self.position = 0

    def read(self) -> np.ndarray:
        reading = self.per_phase[self.position % len(self.per_phase)]
        self.position += 1
        return reading


class LogActuator:
    """Appends one line per shown state: signal time, stage, phase, target, SUMO link states."""

    def __init__(self, path: Path | None):
        self.file = path.open("a", buffering=1) if path is not None else None

    def show(self, t: float, state: SignalState, link_states: str) -> None:
        if self.file is not None:
            self.file.write(f"{t:.1f} {state.stage.name} {state.phase} {state.target} {link_states}\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def make_sensor(adapter: str, path: Path | None, greens: tuple[str, ...]) -> Sensor:
    if adapter == "replay":
        return ReplaySensor(path, len(greens), greens)
    raise RELEDError(f"unknown [sensor] adapter {adapter!r}: this build has 'replay' and 'hil'")


def make_actuator(adapter: str, path: Path | None) -> Actuator:
    if adapter == "log":
        return LogActuator(path)
    raise RELEDError(f"unknown [actuator] adapter {adapter!r}: this build has 'log' and 'hil'")
