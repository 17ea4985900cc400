"""Lanes → per-phase readings: queue, approaching and longest wait for every green phase of every light.

This is the observation's traffic part (the controller computes the same from its own detectors,
``edge_runtime.features``) and the pressures max-pressure needs. It works on one :class:`LaneReader`
and index arrays built once per net, so the environment, a hardware-in-the-loop bridge or an expert
read a decision's worth of traffic with a handful of matrix products and no per-light Python loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_runtime.features import APPROACHING_AT, MAX_WAIT_AT, QUEUE_AT, feature_size
from trainer.sim.intersections import Intersection
from trainer.sim.lanes import LaneReader


class PhaseReadings:
    """Per-phase traffic of ``intersections``, refreshed by :meth:`read` once per decision."""

    def __init__(self, api: Any, intersections: list[Intersection], detector_range: float,
                 count_arrivals: bool = False) -> None:
        self.intersections = intersections
        in_lanes = sorted({lane for i in intersections for lane in i.in_lanes})
        lane_index = {lane: k for k, lane in enumerate(in_lanes)}
        agent_in_lanes = [np.array([lane_index[lane] for lane in i.in_lanes]) for i in intersections]
        self.agent_in_lanes = agent_in_lanes
        self.lanes = LaneReader(api, in_lanes, detector_range, count_arrivals)
        self.out_lanes = sorted({lane for i in intersections for lane in i.out_lanes})
        out_index = {lane: k for k, lane in enumerate(self.out_lanes)}
        agent_out_lanes = [np.array([out_index[lane] for lane in i.out_lanes]) for i in intersections]
        n = len(intersections)
        # per agent: which lanes it sums (one product gives every agent's total)
        self.agent_in = np.zeros((n, len(in_lanes)), dtype=np.float32)
        self.agent_out = np.zeros((n, len(self.out_lanes)), dtype=np.float32)
        for k in range(n):
            self.agent_in[k, agent_in_lanes[k]] = 1.0
            self.agent_out[k, agent_out_lanes[k]] = 1.0
        # per agent: global in/out lane of each movement, and the phase x movement incidence
        self._movements = [
            (agent_in_lanes[k][[m[0] for m in inter.movements]],
             agent_out_lanes[k][[m[1] for m in inter.movements]],
             inter.phase_movements.astype(np.float32))
            for k, inter in enumerate(intersections)]
        # every (agent, phase) row of served lanes stacked, with its slot in the flat observation block
        rows, slots = [], []
        for k, inter in enumerate(intersections):
            for p in range(inter.n_phases):
                row = np.zeros(len(in_lanes), dtype=np.float32)
                row[agent_in_lanes[k][inter.phase_lanes[p]]] = 1.0
                rows.append(row)
                slots.append(k * feature_size() + p)
        self._served = np.stack(rows)
        slots_arr = np.array(slots)
        self._slot_queue = slots_arr + QUEUE_AT
        self._slot_approach = slots_arr + APPROACHING_AT
        self._slot_wait = slots_arr + MAX_WAIT_AT
        self._out_counts: np.ndarray | None = None

    def attach(self, api: Any) -> None:
        """Read from a new SUMO run of the same net (each episode starts one)."""
        self.lanes.restart(api)

    def read(self) -> None:
        """Refresh the lanes; outgoing counts are read lazily, at most once per refresh."""
        self.lanes.read()
        self._out_counts = None

    def fill(self, block: np.ndarray) -> None:
        """Write queue, approaching and max wait of every phase into ``block`` [agents, features]."""
        lanes, served, flat = self.lanes, self._served, block.reshape(-1)
        flat[self._slot_queue] = served @ lanes.queue
        flat[self._slot_approach] = served @ lanes.approaching
        flat[self._slot_wait] = (served * lanes.max_wait).max(axis=1)

    def outgoing_counts(self) -> np.ndarray:
        """Vehicles on every outgoing lane (pressure's downstream side)."""
        if self._out_counts is None:
            self._out_counts = self.lanes.vehicle_counts(self.out_lanes)
        return self._out_counts

    def pressures(self) -> list[np.ndarray]:
        """Per light and phase: Σ over its green movements of (incoming vehicles in range - outgoing)."""
        out_counts = self.outgoing_counts()
        in_counts = self.lanes.queue + self.lanes.approaching
        return [phase_moves @ (in_counts[move_in] - out_counts[move_out])
                for move_in, move_out, phase_moves in self._movements]

    def arrivals(self, k: int) -> np.ndarray:
        """Vehicles that entered each of light ``k``'s incoming lanes (its ``in_lanes`` order) since the last read."""
        return self.lanes.arrivals[self.agent_in_lanes[k]]

    def queued(self) -> np.ndarray:
        """Halting vehicles on each light's incoming lanes."""
        return self.agent_in @ self.lanes.queue

    def waiting(self) -> np.ndarray:
        """Summed waiting seconds on each light's incoming lanes."""
        return self.agent_in @ self.lanes.waiting_sums()

    def intersection_pressure(self) -> np.ndarray:
        """Each light's |incoming vehicles in range - outgoing vehicles|."""
        incoming = self.agent_in @ (self.lanes.queue + self.lanes.approaching)
        return np.abs(incoming - self.agent_out @ self.outgoing_counts())
