"""What each controlled light looks like to the environment: green phases, lanes, movements.

Built once per net from TraCI; the environment then works on index arrays only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.features import MAX_PHASES
from edge_runtime.shield import GREEN_CHARS, SignalState, transition_state

log = logging.getLogger(__name__)

def green_phase_states(states: list[str]) -> list[str]:
    """Distinct green phases of a program, in program order (no yellow, at least one green)."""
    greens: list[str] = []
    for state in states:
        if "y" in state or "Y" in state or not GREEN_CHARS & set(state) or state in greens:
            continue
        greens.append(state)
    return greens


@dataclass(frozen=True)
class Intersection:
    tls_id: str
    green_states: tuple[str, ...]
    in_lanes: tuple[str, ...]  # distinct incoming lanes of controlled links
    out_lanes: tuple[str, ...]
    phase_lanes: np.ndarray  # bool [n_phases, n_in_lanes]: lane has a green link in the phase
    movements: tuple[tuple[int, int], ...]  # (in lane index, out lane index) per controlled link
    phase_movements: np.ndarray  # bool [n_phases, n_movements]
    approaches: int  # distinct incoming edges
    _state_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_phases(self) -> int:
        return len(self.green_states)

    def state_string(self, state: SignalState) -> str:
        """SUMO link states shown for a shield state (memoised per light: few distinct states)."""
        key = (state.stage, state.phase, state.target)
        cache = self._state_cache
        if key not in cache:
            cache[key] = transition_state(self.green_states, *key)
        return cache[key]


def discover_intersection(api: Any, tls_id: str) -> Intersection | None:
    """Read a light's program and links; None when it has fewer than 2 green phases."""
    program = api.trafficlight.getProgram(tls_id)
    logics = [lg for lg in api.trafficlight.getAllProgramLogics(tls_id) if lg.programID == program]
    states = [ph.state for ph in logics[0].phases] if logics else []
    greens = green_phase_states(states)
    if len(greens) > MAX_PHASES:
        log.warning("light %s has %d green phases; only the first %d are used", tls_id, len(greens), MAX_PHASES)
        greens = greens[:MAX_PHASES]
    if len(greens) < 2:
        return None
    links = api.trafficlight.getControlledLinks(tls_id)
    in_lanes: list[str] = []
    out_lanes: list[str] = []
    movements: list[tuple[int, int]] = []
    link_of_movement: list[int] = []
    for index, link_group in enumerate(links):
        for in_lane, out_lane, _via in link_group:
            if in_lane not in in_lanes:
                in_lanes.append(in_lane)
            if out_lane not in out_lanes:
                out_lanes.append(out_lane)
            movements.append((in_lanes.index(in_lane), out_lanes.index(out_lane)))
            link_of_movement.append(index)
    phase_movements = np.array([[greens[p][k] in GREEN_CHARS for k in link_of_movement]
                                for p in range(len(greens))], dtype=bool)
    phase_lanes = np.zeros((len(greens), len(in_lanes)), dtype=bool)
    for m, (i, _o) in enumerate(movements):
        phase_lanes[:, i] |= phase_movements[:, m]
    approaches = len({api.lane.getEdgeID(lane) for lane in in_lanes})
    return Intersection(tls_id, tuple(greens), tuple(in_lanes), tuple(out_lanes), phase_lanes,
                        tuple(movements), phase_movements, approaches)
