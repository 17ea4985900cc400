"""Agent subsets: clusters of neighbouring controlled lights on the road graph (docs/sed.md, "Agent subsets").

Two lights are neighbours when a vehicle leaving one reaches the stop line of the other without
passing a third controlled light; their distance is the shortest such path along lane centre
lines. Subsets grow greedily from the busiest unassigned light (most incoming lanes, then most
neighbours, then id), always adding the nearest unassigned neighbour of the subset, up to K
lights. Everything is sorted, so the partition is the same on every run.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import RELEDError
from trainer.sim.intersections import Intersection
from trainer.sim.net import read_net

DEFAULT_SUBSET_SIZE = 4
NEIGHBOUR_SEARCH_M = 800.0  # further apart along the road, platoons disperse: not neighbours


@dataclass(frozen=True)
class RoadGraph:
    """Distances (m) between neighbouring controlled lights, and where each light sits."""

    lights: tuple[str, ...]
    distance: dict[tuple[str, str], float]  # (upstream, downstream) -> metres, only for neighbours
    position: dict[str, tuple[float, float]]  # net coordinates of each light's stop lines (mean)
    upstream_lanes: dict[tuple[str, str], frozenset[str]]  # (from, to) -> incoming lanes of `to` fed by `from`

    def neighbours(self, light: str) -> list[str]:
        found = {b for (a, b) in self.distance if a == light} | {a for (a, b) in self.distance if b == light}
        return sorted(found)

    def gap(self, a: str, b: str) -> float:
        """Shortest road distance either way; inf when they are not neighbours."""
        return min(self.distance.get((a, b), float("inf")), self.distance.get((b, a), float("inf")))


@dataclass(frozen=True)
class Subset:
    index: int
    lights: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"S{self.index}"


def road_graph(net_file: Path, intersections: Sequence[Intersection],
               search_m: float = NEIGHBOUR_SEARCH_M) -> RoadGraph:
    """Walk downstream from every light's outgoing lanes until another controlled light's stop line."""
    net = read_net(net_file)
    owner_of_in_lane = {lane: inter.tls_id for inter in intersections for lane in inter.in_lanes}
    distance: dict[tuple[str, str], float] = {}
    feeds: dict[tuple[str, str], set[str]] = {}
    position: dict[str, tuple[float, float]] = {}
    for inter in intersections:
        ends = [net.getLane(lane).getShape()[-1] for lane in inter.in_lanes]
        position[inter.tls_id] = (sum(x for x, _ in ends) / len(ends), sum(y for _, y in ends) / len(ends))
        for (to, lane), metres in _reachable_stop_lines(net, inter, owner_of_in_lane, search_m).items():
            key = (inter.tls_id, to)
            distance[key] = min(distance.get(key, float("inf")), metres)
            feeds.setdefault(key, set()).add(lane)
    return RoadGraph(tuple(i.tls_id for i in intersections), distance, position,
                     {k: frozenset(v) for k, v in feeds.items()})


def _reachable_stop_lines(net, inter: Intersection, owner_of_in_lane: dict[str, str],
                          search_m: float) -> dict[tuple[str, str], float]:
    """Dijkstra over lanes from ``inter``'s outgoing lanes; stops at any controlled stop line."""
    best: dict[str, float] = {}
    found: dict[tuple[str, str], float] = {}
    queue = [(0.0, lane) for lane in sorted(inter.out_lanes)]
    while queue:
        dist, lane_id = heapq.heappop(queue)
        if lane_id in best:
            continue
        best[lane_id] = dist
        lane = net.getLane(lane_id)
        reached = dist + lane.getLength()
        owner = owner_of_in_lane.get(lane_id)
        if owner is not None and owner != inter.tls_id:
            if reached <= search_m:
                found.setdefault((owner, lane_id), reached)
            continue
        if owner == inter.tls_id or reached > search_m:
            continue
        for conn in lane.getOutgoing():
            nxt = conn.getToLane().getID()
            if nxt not in best:
                heapq.heappush(queue, (reached, nxt))
    return found


def partition(intersections: Sequence[Intersection], graph: RoadGraph,
              max_size: int = DEFAULT_SUBSET_SIZE) -> list[Subset]:
    """Greedy growth from the busiest unassigned light; each subset is connected on the road graph."""
    if max_size < 1:
        raise RELEDError(f"subset size K must be >= 1, got {max_size}")
    lanes = {i.tls_id: len(i.in_lanes) for i in intersections}
    degree = {tls: len(graph.neighbours(tls)) for tls in lanes}

    def busiest_first(tls: str) -> tuple[int, int, str]:
        return (-lanes[tls], -degree[tls], tls)

    unassigned = set(lanes)
    subsets: list[Subset] = []
    while unassigned:
        seed = min(unassigned, key=busiest_first)
        members = [seed]
        unassigned.discard(seed)
        while len(members) < max_size:
            candidates = [(min(graph.gap(m, c) for m in members), busiest_first(c), c)
                          for c in unassigned if any(graph.gap(m, c) < float("inf") for m in members)]
            if not candidates:
                break
            nearest = min(candidates)[2]
            members.append(nearest)
            unassigned.discard(nearest)
        subsets.append(Subset(len(subsets), tuple(members)))
    return subsets


def boundary_lanes(subset: Subset, intersections: Sequence[Intersection], graph: RoadGraph) -> list[str]:
    """Incoming lanes of the subset not fed from inside it: where outside traffic enters."""
    inside = set(subset.lights)
    internal = {lane for (a, b), fed in graph.upstream_lanes.items() if a in inside and b in inside for lane in fed}
    return sorted(lane for i in intersections if i.tls_id in inside for lane in i.in_lanes if lane not in internal)
