"""Reads the detector view of every incoming lane once per decision (the environment's hot path).

Each incoming lane is seen like a lane-area detector covering ``detector_range`` metres upstream of
the stop line. When SUMO splits a road just before the junction (Ingolstadt has 1 m stubs), the
detector continues onto the upstream lanes that feed it, through junctions without signals, as
RESCO's observation does; it stops at another signal's stop line. Halting vehicles (< 0.1 m/s,
SUMO's definition) are the queue, moving ones are approaching, and the longest wait is the front
vehicle's waiting time on each covered lane (vehicles queue behind it, so it stopped first).
Fully covered lanes take two cheap aggregate calls; only partly covered ones look at vehicles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

HALTING_SPEED = 0.1


@dataclass(frozen=True)
class Segment:
    """The part of one SUMO lane a detector covers: from ``start`` (m) to the lane's end."""

    lane: str
    start: float


def lane_predecessors(api: Any) -> dict[str, list[str]]:
    """For every normal lane, the normal lanes with a link into it."""
    preds: dict[str, list[str]] = {}
    for lane in api.lane.getIDList():
        if lane.startswith(":"):
            continue
        for link in api.lane.getLinks(lane):
            preds.setdefault(link[0], []).append(lane)
    return preds


def detector_segments(api: Any, lane: str, detector_range: float, predecessors: dict[str, list[str]],
                      signal_lanes: set[str]) -> list[Segment]:
    """Segments covering ``detector_range`` upstream of ``lane``'s stop line, stopping at other signals."""
    segments: list[Segment] = []
    stack, seen = [(lane, detector_range)], set()
    while stack:
        current, remaining = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        length = api.lane.getLength(current)
        segments.append(Segment(current, max(length - remaining, 0.0)))
        if remaining > length:
            stack += [(p, remaining - length) for p in predecessors.get(current, ()) if p not in signal_lanes]
    return segments


class LaneReader:
    """Queue, approaching and longest wait per incoming lane, refreshed by :meth:`read`."""

    def __init__(self, api: Any, lanes: list[str], detector_range: float) -> None:
        self.api = api
        self.lanes = lanes
        predecessors = lane_predecessors(api)
        signal_lanes = {ln for tls in api.trafficlight.getIDList() for ln in api.trafficlight.getControlledLanes(tls)}
        segments, owners = [], []
        for k, lane in enumerate(lanes):
            for seg in detector_segments(api, lane, detector_range, predecessors, signal_lanes):
                segments.append(seg)
                owners.append(k)
        self.segment_lanes = [s.lane for s in segments]
        self.segment_start = np.array([s.start for s in segments])
        self.owner = np.array(owners, dtype=np.intp)
        n, m = len(lanes), len(segments)
        self._seg_queue = np.zeros(m, dtype=np.float32)
        self._seg_moving = np.zeros(m, dtype=np.float32)
        self._seg_wait = np.zeros(m, dtype=np.float32)
        self.queue = np.zeros(n, dtype=np.float32)
        self.approaching = np.zeros(n, dtype=np.float32)
        self.max_wait = np.zeros(n, dtype=np.float32)

    def read(self) -> None:
        lane_api, veh_api = self.api.lane, self.api.vehicle
        queue, moving, wait = self._seg_queue, self._seg_moving, self._seg_wait
        for i, lane in enumerate(self.segment_lanes):
            ids = lane_api.getLastStepVehicleIDs(lane)
            if not ids:
                queue[i] = moving[i] = wait[i] = 0.0
                continue
            start = self.segment_start[i]
            if start > 0.0:
                halted = seen = 0
                for vid in ids:
                    if veh_api.getLanePosition(vid) >= start:
                        seen += 1
                        halted += veh_api.getSpeed(vid) < HALTING_SPEED
            else:
                halted, seen = lane_api.getLastStepHaltingNumber(lane), len(ids)
            queue[i], moving[i] = halted, seen - halted
            wait[i] = veh_api.getWaitingTime(ids[-1])
        for target, source in ((self.queue, queue), (self.approaching, moving)):
            target.fill(0.0)
            np.add.at(target, self.owner, source)
        self.max_wait.fill(0.0)
        np.maximum.at(self.max_wait, self.owner, wait)

    def vehicle_counts(self, lanes: list[str]) -> np.ndarray:
        """Vehicles on whole lanes (used for the outgoing side of pressure)."""
        get = self.api.lane.getLastStepVehicleNumber
        return np.fromiter((get(lane) for lane in lanes), dtype=np.float32, count=len(lanes))

    def waiting_sums(self) -> np.ndarray:
        """Summed waiting seconds of the vehicles on each detector's lanes (for the `wait` reward)."""
        get = self.api.lane.getWaitingTime
        per_segment = np.fromiter((get(lane) for lane in self.segment_lanes), dtype=np.float32,
                                  count=len(self.segment_lanes))
        sums = np.zeros(len(self.lanes), dtype=np.float32)
        np.add.at(sums, self.owner, per_segment)
        return sums
