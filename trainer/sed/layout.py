"""What a subset looks like in words: which approach and turn each phase serves, and how far apart.

Prompts need the movements in the terms a traffic engineer (or a language model) uses:
"from N: straight, right". Headings come from the last segment of each incoming lane, turns from
SUMO's connection directions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.sed.clusters import RoadGraph, Subset
from trainer.sim.intersections import Intersection
from trainer.sim.net import read_net

TURNS = {"s": "straight", "l": "left", "r": "right", "L": "left", "R": "right"}  # u-turns are left out
COMPASS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")


@dataclass(frozen=True)
class LightLayout:
    tls_id: str
    label: str  # short name used in prompts ("I1")
    phases: tuple[str, ...]  # per green phase: the movements it serves, in words


@dataclass(frozen=True)
class SubsetLayout:
    subset: Subset
    lights: tuple[LightLayout, ...]
    links: tuple[tuple[str, str, float], ...]  # (label, label, metres by road) for neighbours inside the subset


def compass_from(dx: float, dy: float) -> str:
    """Where traffic comes from, given its direction of travel (SUMO: y points north)."""
    bearing = math.degrees(math.atan2(-dx, -dy)) % 360  # reverse the travel direction
    return COMPASS[round(bearing / 45) % 8]


def light_layouts(net_file: Path, intersections: Sequence[Intersection]) -> dict[str, tuple[str, ...]]:
    """Per light, per green phase: 'from N: left, straight; from S: ...'."""
    net = read_net(net_file)
    out: dict[str, tuple[str, ...]] = {}
    for inter in intersections:
        moves = []
        for in_idx, out_idx in inter.movements:
            lane = net.getLane(inter.in_lanes[in_idx])
            (x0, y0), (x1, y1) = lane.getShape()[-2:]
            to = inter.out_lanes[out_idx]
            turn = next((TURNS.get(c.getDirection()) for c in lane.getOutgoing() if c.getToLane().getID() == to),
                        "straight")
            moves.append((compass_from(x1 - x0, y1 - y0), turn))
        phases = []
        for p in range(inter.n_phases):
            by_approach: dict[str, list[str]] = {}
            for m, (approach, turn) in enumerate(moves):
                if turn and inter.phase_movements[p, m] and turn not in by_approach.setdefault(approach, []):
                    by_approach[approach].append(turn)
            phases.append("; ".join(f"from {a}: {', '.join(t)}" for a, t in sorted(by_approach.items()) if t))
        out[inter.tls_id] = tuple(phases)
    return out


def subset_layout(subset: Subset, phases: dict[str, tuple[str, ...]], graph: RoadGraph) -> SubsetLayout:
    labels = {tls: f"I{k + 1}" for k, tls in enumerate(subset.lights)}
    lights = tuple(LightLayout(tls, labels[tls], phases[tls]) for tls in subset.lights)
    links = tuple((labels[a], labels[b], graph.gap(a, b)) for i, a in enumerate(subset.lights)
                  for b in subset.lights[i + 1:] if graph.gap(a, b) < float("inf"))
    return SubsetLayout(subset, lights, links)
