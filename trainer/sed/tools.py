"""The classical controls the verified expert always has in its pool, and the one executor of every control.

A control says how one light is driven for a horizon. Four executors cover every tool: max-pressure and
greedy decide from the live readings, ``actuated`` extends the green while vehicles keep coming (gap-out)
between a minimum and a maximum green, and ``plan`` runs a fixed-time :class:`TimingPlan`. The net's own
program, a Webster plan and the LLM's timing plans are all plans. Every proposal goes through the
environment's safety shield, like any controller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.features import APPROACHING_AT, CURRENT_PHASE_AT, MAX_PHASES, QUEUE_AT, TIME_IN_PHASE_AT
from edge_runtime.shield import SignalTiming
from trainer.controllers import Controller
from trainer.controllers.base import greedy_phase, max_pressure_phase
from trainer.rollout import Observations
from trainer.sed.answers import MAX_CYCLE_S, TOOLS, StrategyChoice, TimingPlan, cycle_bounds
from trainer.sed.bounds import SATURATION_FLOW_VEH_PER_S
from trainer.sed.clusters import RoadGraph
from trainer.sim.net import SignalProgram

if TYPE_CHECKING:
    from trainer.env import TrafficSignalEnv
    from trainer.sim.intersections import Intersection

EXECUTORS = ("max-pressure", "greedy", "actuated", "plan")
PLATOON_SPEED_M_S = 13.9  # 50 km/h: the speed a green wave is timed for
FAVOUR_WEIGHT = 1.5  # a favoured phase's critical flow ratio counts this much more in the splits


@dataclass(frozen=True)
class LightControl:
    """How one light is driven for a horizon."""

    executor: str  # one of EXECUTORS
    plan: TimingPlan | None = None  # executor "plan"
    min_green: float = 0.0  # executor "actuated"
    max_green: float = 0.0
    favour: int = -1  # actuated: the phase that may run to max_green (others stop halfway); -1: none
    origin: str = field(default="", compare=False)  # the tool or LLM answer it came from, for the record

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}")
        if self.executor == "plan" and self.plan is None:
            raise ValueError("a plan control needs a plan")

    def describe(self) -> str:
        if self.executor == "plan":
            assert self.plan is not None
            return f"plan order {list(self.plan.order)} green {list(self.plan.green)} offset {self.plan.offset}"
        if self.executor == "actuated":
            favour = f", favour phase {self.favour}" if self.favour >= 0 else ""
            return f"actuated {self.min_green:g}-{self.max_green:g} s{favour}"
        return self.executor


def controls_name(controls: Sequence[LightControl]) -> str:
    """'greedy' when every light runs the same tool, else 'I1 greedy, I2 max-pressure, ...'."""
    origins = [c.origin or c.executor for c in controls]
    if len(set(origins)) == 1:
        return origins[0]
    return ", ".join(f"I{i + 1} {origin}" for i, origin in enumerate(origins))


@dataclass(frozen=True)
class Candidate:
    """A control for every light of one subset (label order), where it came from, and what it is called."""

    name: str  # "max-pressure", "webster", "llm-plan", "llm-strategy", ...
    source: str  # "tool" or "llm"
    controls: tuple[LightControl, ...]
    note: str = ""  # what the LLM asked for (strategy mode), for the record
    continues: bool = False  # the controls already running, plans not restarted

    @property
    def kind(self) -> str:
        """keep, a tool's name, llm-plan, llm-strategy, or mixed (tools differing per light)."""
        if self.continues:
            return "keep"
        return self.name if self.source == "llm" or self.name in TOOLS else "mixed"

    @property
    def key(self) -> tuple[tuple[LightControl, ...], bool]:
        """Two candidates with equal controls that both start now (or both continue) drive the same traffic:
        evaluated once."""
        return self.controls, self.continues

    def describe(self) -> list[str]:
        return [c.describe() for c in self.controls]


@dataclass
class ToolController(Controller):
    """Drives every light with its own control; plans count time from when their control was set."""

    controls: list[LightControl] = field(default_factory=list)  # per agent, env order
    since: list[float] = field(default_factory=list)  # per agent: when its control was set (plans start there)
    timing: SignalTiming = field(default_factory=SignalTiming)
    record_arrivals: bool = False
    name = "tools"
    needs_pressure = True
    needs_inflow = True

    def __post_init__(self) -> None:
        self._last: dict[int, int] = {}
        self.arrivals: list[list[np.ndarray]] = []  # per decision, per agent: lane arrivals (when recorded)

    def attach(self, env: TrafficSignalEnv) -> None:
        self.agents = list(env.possible_agents)
        self.timing = env.timing

    def set_control(self, k: int, control: LightControl, now: float) -> None:
        self.controls[k] = control
        self.since[k] = now
        self._last.pop(k, None)

    def reset(self, seed: int) -> None:
        self._last = {}
        self.arrivals = []

    def act(self, observations: Observations, infos: dict[str, dict[str, Any]]) -> dict[str, int]:
        if self.record_arrivals:
            self.arrivals.append([infos[a]["lane_arrivals"].copy() for a in self.agents])
        actions = {}
        for k, agent in enumerate(self.agents):
            actions[agent] = self._phase(k, observations[agent], infos[agent])
            self._last[k] = actions[agent]
        return actions

    def _phase(self, k: int, observation: dict[str, np.ndarray], info: dict[str, Any]) -> int:
        control = self.controls[k]
        if control.executor == "max-pressure":
            return max_pressure_phase(observation, info)
        if control.executor == "greedy":
            return greedy_phase(observation)
        if control.executor == "plan":
            assert control.plan is not None
            return control.plan.phase_at(info["time"] - self.since[k], self.timing)
        return self._actuated(k, control, observation)

    def _actuated(self, k: int, control: LightControl, observation: dict[str, np.ndarray]) -> int:
        """Gap-out: hold the green while vehicles keep moving towards its stop lines (no gap), up to its max
        green; then the next phase in cycle order that has demand (none: rest in the current green). A green
        whose queue stands still (blocked, or waiting on a shared lane) gaps out."""
        vec, mask = observation["observation"], observation["action_mask"]
        elapsed = float(vec[TIME_IN_PHASE_AT])
        if elapsed <= 0 and k in self._last:  # changing: keep asking for the phase already chosen
            return self._last[k]
        current = int(np.argmax(vec[CURRENT_PHASE_AT:CURRENT_PHASE_AT + MAX_PHASES]))
        demand = vec[QUEUE_AT:QUEUE_AT + MAX_PHASES] + vec[APPROACHING_AT:APPROACHING_AT + MAX_PHASES]
        longest = control.max_green if control.favour in (-1, current) else (control.min_green + control.max_green) / 2
        flowing = vec[APPROACHING_AT + current] >= 1
        if elapsed < control.min_green or (elapsed < longest and flowing):
            return current
        n = int(mask.sum())
        for step in range(1, n):
            phase = (current + step) % n
            if demand[phase] > 0:
                return phase
        return current


# -- plans from the net and from measured flows ---------------------------------------------------
def program_plan(inter: Intersection, program: SignalProgram | None, timing: SignalTiming) -> TimingPlan:
    """The net's own fixed-time program as a plan: its green phases in program order, their durations
    (clamped to the shield's min..max green) and its offset."""
    greens = {p: 0.0 for p in range(inter.n_phases)}
    order: list[int] = []
    for state, seconds in program.phases if program else ():
        if state in inter.green_states:
            p = inter.green_states.index(state)
            greens[p] += seconds
            if p not in order:
                order.append(p)
    order += [p for p in range(inter.n_phases) if p not in order]
    green = tuple(_clamp_green(greens[p] or 20.0, timing) for p in order)
    return TimingPlan(tuple(order), green, int(program.offset) % 300 if program else 0)


def _clamp_green(seconds: float, timing: SignalTiming) -> int:
    return round(min(max(seconds, timing.min_green), timing.max_green))


def critical_ratios(inter: Intersection, lane_flows: np.ndarray) -> np.ndarray:
    """Per phase: the largest flow ratio (arrivals per second / saturation flow) of the lanes it serves."""
    ratios = lane_flows / SATURATION_FLOW_VEH_PER_S
    return np.array([ratios[inter.phase_lanes[p]].max(initial=0.0) for p in range(inter.n_phases)])


def webster_cycle(ratios: np.ndarray, timing: SignalTiming) -> float:
    """Webster's optimal cycle C = (1.5 L + 5) / (1 − Y), L the lost time per cycle, Y the summed ratios."""
    lost = len(ratios) * (timing.yellow + timing.all_red)
    total = float(ratios.sum())
    cycle = (1.5 * lost + 5) / (1 - total) if total < 0.95 else MAX_CYCLE_S
    return float(np.clip(cycle, *cycle_bounds(len(ratios), timing)))


def webster_split(ratios: np.ndarray, cycle: float, timing: SignalTiming, favour: int = -1) -> tuple[int, ...]:
    """Greens proportional to the critical flow ratios (equal when nothing was measured)."""
    weights = ratios.astype(float).copy()
    if weights.sum() <= 0:
        weights[:] = 1.0
    weights = np.maximum(weights, 0.02 * weights.sum())  # every phase keeps a share
    if 0 <= favour < len(weights):
        weights[favour] *= FAVOUR_WEIGHT
    effective = max(cycle - len(weights) * (timing.yellow + timing.all_red), 0.0)
    return tuple(_clamp_green(effective * w / weights.sum(), timing) for w in weights)


def webster_plans(intersections: Sequence[Intersection], lane_flows: Sequence[np.ndarray], graph: RoadGraph,
                  timing: SignalTiming, cycle: float | None = None,
                  favour: Sequence[int] | None = None) -> list[TimingPlan]:
    """Webster plans for the lights of one subset on a common cycle, offset along its main road.

    The cycle is the longest of the lights' Webster cycles (or ``cycle``). The main road is a tree over
    the subset's road links grown from the light with the most demand, always along the link that carries
    the most measured flow; each downstream light starts its cycle with the phase serving that link, one
    travel time (at 50 km/h) after its upstream light starts its own.
    """
    ratios = [critical_ratios(inter, flows) for inter, flows in zip(intersections, lane_flows, strict=True)]
    common = cycle if cycle is not None else max(webster_cycle(r, timing) for r in ratios)
    favour = list(favour) if favour is not None else [-1] * len(intersections)
    ids = [inter.tls_id for inter in intersections]
    flow_of = {inter.tls_id: dict(zip(inter.in_lanes, flows, strict=True))
               for inter, flows in zip(intersections, lane_flows, strict=True)}
    root = int(np.argmax([r.sum() for r in ratios]))
    first_phase = {root: int(np.argmax(ratios[root]))}
    offset = {root: 0.0}
    while len(offset) < len(ids):
        links = [(sum(flow_of[ids[b]].get(lane, 0.0) for lane in graph.upstream_lanes.get((ids[a], ids[b]), ())),
                  a, b) for a in offset for b in range(len(ids)) if b not in offset
                 and (ids[a], ids[b]) in graph.distance]
        if not links:  # not connected inside the subset: start on its own busiest phase
            b = next(b for b in range(len(ids)) if b not in offset)
            offset[b], first_phase[b] = 0.0, int(np.argmax(ratios[b]))
            continue
        _, a, b = max(links)
        fed = graph.upstream_lanes[(ids[a], ids[b])]
        fed_lanes = [m for m, lane in enumerate(intersections[b].in_lanes) if lane in fed]
        first_phase[b] = int(np.argmax(intersections[b].phase_lanes[:, fed_lanes].sum(axis=1)))
        offset[b] = offset[a] + graph.distance[(ids[a], ids[b])] / PLATOON_SPEED_M_S
    plans = []
    for k, inter in enumerate(intersections):
        greens = webster_split(ratios[k], common, timing, favour[k])
        order = [(first_phase[k] + step) % inter.n_phases for step in range(inter.n_phases)]
        plans.append(TimingPlan(tuple(order), tuple(greens[p] for p in order), int(offset[k] % common) % 300))
    return plans


def tool_candidates(subset_lights: Sequence[Intersection], programs: dict[str, SignalProgram],
                    lane_flows: Sequence[np.ndarray], graph: RoadGraph, timing: SignalTiming) -> list[Candidate]:
    """The classical controls every pool holds, for one subset."""
    n = len(subset_lights)
    actuated = LightControl("actuated", min_green=timing.min_green, max_green=timing.max_green, origin="actuated")
    webster = webster_plans(subset_lights, lane_flows, graph, timing)
    return [
        Candidate("max-pressure", "tool", (adaptive("max-pressure"),) * n),
        Candidate("greedy", "tool", (adaptive("greedy"),) * n),
        Candidate("program", "tool", tuple(LightControl("plan", program_plan(i, programs.get(i.tls_id), timing),
                                                        origin="program") for i in subset_lights)),
        Candidate("webster", "tool", tuple(LightControl("plan", p, origin="webster") for p in webster)),
        Candidate("actuated", "tool", (actuated,) * n),
    ]


def adaptive(tool: str, origin: str = "") -> LightControl:
    """Max-pressure or greedy for one light."""
    return LightControl(tool, origin=origin or tool)


def strategy_candidate(choices: Sequence[StrategyChoice], subset_lights: Sequence[Intersection],
                       programs: dict[str, SignalProgram], lane_flows: Sequence[np.ndarray], graph: RoadGraph,
                       timing: SignalTiming) -> Candidate:
    """The controls an LLM's strategy answer names, one per light. Lights that chose Webster share the
    longest cycle any of them asked for, so their offsets still make a green wave."""
    cycles = [c.cycle for c in choices if c.tool == "webster"]
    webster = webster_plans(subset_lights, lane_flows, graph, timing, cycle=max(cycles),
                            favour=[c.favour for c in choices]) if cycles else []
    controls = []
    for k, (choice, inter) in enumerate(zip(choices, subset_lights, strict=True)):
        origin = f"llm:{choice.tool}"
        if choice.tool in ("max-pressure", "greedy"):
            controls.append(adaptive(choice.tool, origin))
        elif choice.tool == "program":
            controls.append(LightControl("plan", program_plan(inter, programs.get(inter.tls_id), timing),
                                         origin=origin))
        elif choice.tool == "webster":
            controls.append(LightControl("plan", webster[k], origin=origin))
        else:
            controls.append(LightControl("actuated", min_green=choice.min_green, max_green=choice.max_green,
                                         favour=choice.favour, origin=origin))
    note = "; ".join(f"{c.tool}" + "".join(f" {k}={v}" for k, v in c.as_dict().items() if k != "tool")
                     for c in choices)
    return Candidate("llm-strategy", "llm", tuple(controls), note)
