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

    def __init__(self, api: Any, lanes: list[str], detector_range: float, count_arrivals: bool = False) -> None:
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
        self.owner = np.array(owners, dtype=np.intp)
        # Each SUMO lane is queried once per read, even when several detectors cover it.
        self._distinct = list(dict.fromkeys(self.segment_lanes))
        index = {lane: j for j, lane in enumerate(self._distinct)}
        # per distinct lane, the segments on it: (segment index, start); only occupied lanes are looked at
        self._segments_on = [[] for _ in self._distinct]
        for i, seg in enumerate(segments):
            self._segments_on[index[seg.lane]].append((i, float(seg.start)))
        self._segment_lane = np.array([index[s.lane] for s in segments], dtype=np.intp)
        self._first_segment = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        n, m = len(lanes), len(segments)
        self._seg_queue = np.zeros(m, dtype=np.float32)
        self._seg_moving = np.zeros(m, dtype=np.float32)
        self._seg_wait = np.zeros(m, dtype=np.float32)
        self.queue = np.zeros(n, dtype=np.float32)
        self.approaching = np.zeros(n, dtype=np.float32)
        self.max_wait = np.zeros(n, dtype=np.float32)
        # vehicles on each lane (the lane itself, not the detector) that were not on it at the last read
        self.count_arrivals = count_arrivals
        self.arrivals = np.zeros(n, dtype=np.float32)
        self._own = [index[lane] for lane in lanes]
        self.seen: list[set[str]] = [set() for _ in lanes]

    def restart(self, api: Any) -> None:
        """Read from a new SUMO run of the same net; arrivals count from scratch."""
        self.api = api
        self.seen = [set() for _ in self.lanes]

    def read(self) -> None:
        lane_api, veh_api = self.api.lane, self.api.vehicle
        get_ids, get_halting = lane_api.getLastStepVehicleIDs, lane_api.getLastStepHaltingNumber
        get_pos, get_speed, get_wait = veh_api.getLanePosition, veh_api.getSpeed, veh_api.getWaitingTime
        vehicles = [get_ids(lane) for lane in self._distinct]
        queue, moving, wait = self._seg_queue, self._seg_moving, self._seg_wait
        queue.fill(0.0)
        moving.fill(0.0)
        wait.fill(0.0)
        for j, ids in enumerate(vehicles):
            if not ids:  # most lanes near a stop line are empty at any moment: nothing to ask SUMO
                continue
            front_wait = get_wait(ids[-1])
            halting = -1
            for i, start in self._segments_on[j]:
                if start == 0.0 or get_pos(ids[0]) >= start:  # the whole queue is inside the range
                    if halting < 0:
                        halting = get_halting(self._distinct[j])
                    halted, seen = halting, len(ids)
                else:  # front to back (SUMO lists the front vehicle last) until out of range
                    halted = seen = 0
                    for vid in reversed(ids):
                        if get_pos(vid) < start:
                            break
                        seen += 1
                        halted += get_speed(vid) < HALTING_SPEED
                queue[i], moving[i], wait[i] = halted, seen - halted, front_wait
        n = len(self.lanes)
        self.queue[:] = np.bincount(self.owner, queue, minlength=n)
        self.approaching[:] = np.bincount(self.owner, moving, minlength=n)
        self.max_wait[:] = np.maximum.reduceat(wait, self._first_segment)
        if self.count_arrivals:
            for k, j in enumerate(self._own):
                ids = set(vehicles[j])
                self.arrivals[k] = len(ids - self.seen[k])
                self.seen[k] = ids

    def vehicle_counts(self, lanes: list[str]) -> np.ndarray:
        """Vehicles on whole lanes (used for the outgoing side of pressure)."""
        get = self.api.lane.getLastStepVehicleNumber
        return np.fromiter((get(lane) for lane in lanes), dtype=np.float32, count=len(lanes))

    def waiting_sums(self) -> np.ndarray:
        """Summed waiting seconds of the vehicles on each detector's lanes (for the `wait` reward)."""
        get = self.api.lane.getWaitingTime
        per_lane = np.array([get(lane) for lane in self._distinct], dtype=np.float32)
        per_segment = per_lane[self._segment_lane]
        return np.bincount(self.owner, per_segment, minlength=len(self.lanes)).astype(np.float32)
