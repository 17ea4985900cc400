"""Reads the detector view of every incoming lane once per decision (the environment's hot path).

Each lane is seen like a 200 m lane-area detector ending at the stop line: halting vehicles
(< 0.1 m/s, SUMO's definition) are the queue, moving ones are approaching, and the front
vehicle's waiting time is the lane's longest wait (vehicles queue behind it, so it stopped first).
Short lanes take two cheap aggregate calls; only lanes longer than the range look at vehicles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HALTING_SPEED = 0.1


class LaneReader:
    def __init__(self, api: Any, lanes: list[str], detector_range: float) -> None:
        self.api = api
        self.lanes = lanes
        lengths = np.array([api.lane.getLength(lane) for lane in lanes])
        self.range_start = np.maximum(lengths - detector_range, 0.0)
        self.is_long = lengths > detector_range
        n = len(lanes)
        self.queue = np.zeros(n, dtype=np.float32)
        self.approaching = np.zeros(n, dtype=np.float32)
        self.max_wait = np.zeros(n, dtype=np.float32)

    def read(self) -> None:
        lane_api, veh_api = self.api.lane, self.api.vehicle
        queue, approaching, max_wait = self.queue, self.approaching, self.max_wait
        for i, lane in enumerate(self.lanes):
            ids = lane_api.getLastStepVehicleIDs(lane)
            if not ids:
                queue[i] = approaching[i] = max_wait[i] = 0.0
                continue
            if self.is_long[i]:
                start = self.range_start[i]
                halted = moving = 0
                for vid in ids:
                    if veh_api.getLanePosition(vid) >= start:
                        if veh_api.getSpeed(vid) < HALTING_SPEED:
                            halted += 1
                        else:
                            moving += 1
                queue[i], approaching[i] = halted, moving
            else:
                halted = lane_api.getLastStepHaltingNumber(lane)
                queue[i], approaching[i] = halted, len(ids) - halted
            max_wait[i] = veh_api.getWaitingTime(ids[-1])

    def vehicle_counts(self, lanes: list[str]) -> np.ndarray:
        """Vehicles on whole lanes (used for the outgoing side of pressure)."""
        get = self.api.lane.getLastStepVehicleNumber
        return np.fromiter((get(lane) for lane in lanes), dtype=np.float32, count=len(lanes))

    def waiting_sums(self) -> np.ndarray:
        """Accumulated waiting seconds of the vehicles on each incoming lane (for the `wait` reward)."""
        get = self.api.lane.getWaitingTime
        return np.fromiter((get(lane) for lane in self.lanes), dtype=np.float32, count=len(self.lanes))
