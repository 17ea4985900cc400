"""The LLM as a signal controller for every subset, in `plan` or `step` mode (docs/sed.md).

An expert is a ``Controller``: `reled eval --controller llm` runs it like any heuristic, and the
refinement loop records what it proposes as demonstrations. Every failed call (invalid answer,
late answer, server error) is counted and replaced by holding the current plan or phase.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.features import (
    CURRENT_PHASE_AT,
    MAX_PHASES,
    MAX_WAIT_AT,
    TIME_IN_PHASE_AT,
    feature_size,
    per_phase_values,
)
from trainer.controllers import Controller
from trainer.rollout import stack_observations
from trainer.sed.answers import AnswerError, AnswerFormat, TimingPlan
from trainer.sed.bounds import VEHICLE_SPACE_M
from trainer.sed.clusters import DEFAULT_SUBSET_SIZE, Subset, boundary_lanes, partition, road_graph
from trainer.sed.layout import SubsetLayout, light_layouts, subset_layout
from trainer.sed.llm import LLMBackend, LLMCallError
from trainer.sed.prompts import PhaseStats, messages, plan_prompt, step_prompt
from trainer.sed.tools import LightControl

if TYPE_CHECKING:
    from trainer.env import TrafficSignalEnv
    from trainer.sim.intersections import Intersection

log = logging.getLogger(__name__)

MODES = ("verified", "plan", "step")
DEFAULT_HORIZON_S = 900.0
EDGE = "the network edge"


@dataclass
class LLMStats:
    """What the model did in one episode."""

    calls: int = 0
    valid: int = 0
    invalid: int = 0
    late: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def validity(self) -> float:
        return self.valid / self.calls if self.calls else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "validity": self.validity}


@dataclass(frozen=True)
class SubsetContext:
    """Everything fixed about one subset: its layout, answer rules, where outside traffic enters."""

    subset: Subset
    layout: SubsetLayout
    answer: AnswerFormat
    agents: tuple[int, ...]  # indices into env.intersections
    boundary: tuple[str, ...]  # incoming lanes fed from outside the subset
    sources: tuple[str, ...]  # per boundary lane: the light feeding it ("S1/I2") or the network edge
    capacity_vehicles: float  # vehicles the subset's detectors hold: the reward normaliser (R_max)


def subset_contexts(env: TrafficSignalEnv, mode: str, max_size: int = DEFAULT_SUBSET_SIZE) -> list[SubsetContext]:
    graph = road_graph(env.scenario.net, env.intersections)
    subsets = partition(env.intersections, graph, max_size)
    phases = light_layouts(env.scenario.net, env.intersections)
    index = {inter.tls_id: k for k, inter in enumerate(env.intersections)}
    where = {tls: (s, k) for s in subsets for k, tls in enumerate(s.lights)}
    range_m = env.config.detector_range
    contexts = []
    for subset in subsets:
        layout = subset_layout(subset, phases, graph)
        lanes = boundary_lanes(subset, env.intersections, graph)
        sources = []
        for lane in lanes:
            feeder = next((a for (a, b), fed in sorted(graph.upstream_lanes.items())
                           if lane in fed and b in subset.lights and a not in subset.lights), None)
            sources.append(EDGE if feeder is None else f"{where[feeder][0].name}/I{where[feeder][1] + 1}")
        agents = tuple(index[tls] for tls in subset.lights)
        n_phases = tuple(env.intersections[k].n_phases for k in agents)
        in_lanes = sum(len(env.intersections[k].in_lanes) for k in agents)
        contexts.append(SubsetContext(
            subset, layout, AnswerFormat(mode, tuple(light.label for light in layout.lights), n_phases, env.timing),
            agents, tuple(lanes), tuple(sources), in_lanes * range_m / VEHICLE_SPACE_M))
    return contexts


class InflowMeter:
    """Vehicles entering each subset across its boundary lanes, per decision step and per source.

    It reads the per-lane arrivals the environment puts in ``infos`` (``with_inflow``), so it runs the
    same on recorded or device data as on a live simulation.
    """

    def __init__(self, contexts: list[SubsetContext], intersections: list[Intersection]) -> None:
        self.contexts = contexts
        where = {lane: (inter.tls_id, m) for inter in intersections for m, lane in enumerate(inter.in_lanes)}
        self._where = [[where[lane] for lane in ctx.boundary] for ctx in contexts]
        self.reset()

    def reset(self) -> None:
        self.per_source: list[dict[str, list[float]]] = [{} for _ in self.contexts]

    def update(self, infos: dict[str, dict[str, Any]]) -> None:
        for j, ctx in enumerate(self.contexts):
            counts: dict[str, float] = {}
            for (tls, m), source in zip(self._where[j], ctx.sources, strict=True):
                counts[source] = counts.get(source, 0.0) + float(infos[tls]["lane_arrivals"][m])
            for source, n in counts.items():
                self.per_source[j].setdefault(source, []).append(n)

    def totals(self, j: int) -> np.ndarray:
        """Vehicles entering subset j at each decision step, all sources together (what ε_j measures)."""
        per_source = list(self.per_source[j].values())
        return np.sum(per_source, axis=0) if per_source else np.zeros(0)

    def summary(self, j: int, last_steps: int | None = None) -> str:
        """Inflow of subset j in words, over the last steps (all by default)."""
        window = slice(-last_steps, None) if last_steps else slice(None)
        per_source = {s: sum(v[window]) for s, v in self.per_source[j].items()}
        if not per_source:
            return "Entering the group: not measured yet."
        total = sum(per_source.values())
        parts = ", ".join(f"{n:.0f} from {s}" for s, n in sorted(per_source.items(), key=lambda kv: -kv[1]) if n)
        return f"Entering the group: {total:.0f}" + (f" ({parts})" if parts else "")


def phase_stats(ctx: SubsetContext, block: np.ndarray, n_phases: list[int]) -> list[PhaseStats]:
    """Per light of the subset: (queue, approaching, longest wait) per phase, from rows in the schema layout."""
    out = []
    for label, k in zip(ctx.answer.labels, ctx.agents, strict=True):
        out.append(PhaseStats(label, per_phase_values(block[k], n_phases[k])))
    return out


class DemandWindow:
    """Observations averaged over a window of decisions (longest wait: the largest seen): the demand a
    plan or strategy prompt reports for the period that just ended."""

    def __init__(self, n_agents: int) -> None:
        self._sums = np.zeros((n_agents, feature_size()))
        self._waits = np.zeros((n_agents, MAX_PHASES))
        self._steps = 0

    def add(self, block: np.ndarray) -> None:
        self._sums += block
        self._waits = np.maximum(self._waits, block[:, MAX_WAIT_AT:MAX_WAIT_AT + MAX_PHASES])
        self._steps += 1

    def stats(self, ctx: SubsetContext, n_phases: list[int]) -> list[PhaseStats] | None:
        """Per light of the subset, per phase; None before anything was measured."""
        if not self._steps:
            return None
        block = self._sums / self._steps
        block[:, MAX_WAIT_AT:MAX_WAIT_AT + MAX_PHASES] = self._waits
        return phase_stats(ctx, block, n_phases)

    def clear(self) -> None:
        self._sums[:] = 0.0
        self._waits[:] = 0.0
        self._steps = 0


@dataclass
class LLMExpert(Controller):
    """Base of both modes: subsets, the model, counted fallbacks, feedback per subset."""

    backend: LLMBackend | None  # None: no model (the verified expert's --no-llm)
    mode: str = "plan"
    subset_size: int = DEFAULT_SUBSET_SIZE
    horizon_s: float = DEFAULT_HORIZON_S
    temperature: float = 0.0
    seed: int = 0
    max_tokens: int = 512
    feedback: dict[int, str] = field(default_factory=dict)
    name = "llm"
    needs_inflow = True

    def __post_init__(self) -> None:
        self.stats = LLMStats()
        self.finished: list[LLMStats] = []  # earlier episodes'
        self.contexts: list[SubsetContext] = []
        self._calls = 0
        self.schedule: list[tuple[float, tuple[LightControl, ...]]] = []  # the controls in force from each time
        self.decisions: list[dict[str, Any]] = []  # verified mode: every subset's candidates and winner

    def attach(self, env: TrafficSignalEnv) -> None:
        self.env = env
        if not self.contexts:
            self.contexts = subset_contexts(env, "plan" if self.mode == "verified" else self.mode, self.subset_size)
            self.meter = InflowMeter(self.contexts, env.intersections)
            self._n_phases = [inter.n_phases for inter in env.intersections]
            self._agents = [inter.tls_id for inter in env.intersections]

    def reset(self, seed: int) -> None:
        if self.stats.calls:
            self.finished.append(self.stats)
        self.stats = LLMStats()
        self.meter.reset()
        self.schedule = []
        self.decisions = []

    def lookahead_stats(self) -> dict[str, Any]:
        """Look-aheads run, failed and timed out (the verified mode's; none here)."""
        return {}

    def total_stats(self) -> LLMStats:
        """Every episode's counts summed (what `reled eval` reports)."""
        total = LLMStats()
        for stats in [*self.finished, self.stats]:
            for key, value in asdict(stats).items():
                setattr(total, key, getattr(total, key) + value)
        return total

    def ask(self, j: int, user: str, answer: AnswerFormat | None = None) -> dict[str, Any] | None:
        """One call for subset j (in its own answer format unless ``answer`` is given): the parsed answer,
        or None (counted) when it failed."""
        ctx = self.contexts[j]
        answer = answer or ctx.answer
        self.stats.calls += 1
        self._calls += 1
        try:
            reply = self.backend.chat(messages(answer.mode, self.env.timing, user), answer,
                                      temperature=self.temperature, seed=self.seed * 100_003 + self._calls,
                                      max_tokens=self.max_tokens, session=ctx.subset.name)
        except LLMCallError as exc:
            if exc.late:
                self.stats.late += 1
            else:
                self.stats.failed += 1
            log.info("subset %s: LLM call failed (%s); holding", ctx.subset.name, exc)
            return None
        self.stats.prompt_tokens += reply.prompt_tokens
        self.stats.completion_tokens += reply.completion_tokens
        self.stats.seconds += reply.seconds
        try:
            parsed = answer.parse(reply.text)
        except AnswerError as exc:
            self.stats.invalid += 1
            log.info("subset %s: invalid answer (%s): %r; holding", ctx.subset.name, exc, reply.text[:200])
            return None
        self.stats.valid += 1
        return parsed

    def _block(self, observations: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
        return stack_observations(observations, self._agents)[0]


class PlanExpert(LLMExpert):
    """Once per subset per horizon: a timing plan per light, executed at every decision."""

    def reset(self, seed: int) -> None:
        super().reset(seed)
        timing = self.env.timing
        green = int(min(max(20, timing.min_green), timing.max_green))
        self.plans: list[TimingPlan] = [TimingPlan(tuple(range(n)), (green,) * n, 0) for n in self._n_phases]
        self.plan_start = -np.inf
        self.history: list[dict[str, Any]] = []  # the plans in force, for the manifest
        self.window = DemandWindow(len(self._agents))  # the traffic seen since the last plan

    def act(self, observations: dict[str, dict[str, np.ndarray]], infos: dict[str, dict]) -> dict[str, int]:
        now = infos[self._agents[0]]["time"]
        self.meter.update(infos)
        self.window.add(self._block(observations))
        if now - self.plan_start >= self.horizon_s - 1e-6:
            self._replan(now)
        return {agent: int(self.plans[k].phase_at(now - self.plan_start, self.env.timing))
                for k, agent in enumerate(self._agents)}

    def ask_plan(self, j: int) -> dict[str, TimingPlan] | None:
        """Subset j's plans for the next horizon from the demand of the last one (None: the call failed)."""
        ctx = self.contexts[j]
        steps_per_horizon = max(1, round(self.horizon_s / self.env.timing.delta))
        demand = self.window.stats(ctx, self._n_phases) if np.isfinite(self.plan_start) else None
        user = plan_prompt(ctx.layout, ctx.answer, demand, self.meter.summary(j, steps_per_horizon),
                           self.horizon_s, self.feedback.get(j, ""))
        return self.ask(j, user)

    def _replan(self, now: float) -> None:
        """New plans for every subset from the traffic seen since the last plan."""
        for j, ctx in enumerate(self.contexts):
            answer = self.ask_plan(j)
            if answer is None:
                continue
            for label, k in zip(ctx.answer.labels, ctx.agents, strict=True):
                self.plans[k] = answer[label]
        self.history.append({"time": now, "plans": {self._agents[k]: p.as_dict() for k, p in enumerate(self.plans)}})
        self.schedule.append((now, tuple(LightControl("plan", p, origin="llm-plan") for p in self.plans)))
        self.plan_start = now
        self.window.clear()


class StepExpert(LLMExpert):
    """One call per subset per decision with the live state; a failed call holds the current phases."""

    def reset(self, seed: int) -> None:
        super().reset(seed)
        self.switches = np.zeros(len(self._agents), dtype=int)

    def act(self, observations: dict[str, dict[str, np.ndarray]], infos: dict[str, dict]) -> dict[str, int]:
        self.meter.update(infos)
        block = self._block(observations)
        current = block[:, CURRENT_PHASE_AT:CURRENT_PHASE_AT + MAX_PHASES].argmax(axis=1)
        actions = {agent: int(current[k]) for k, agent in enumerate(self._agents)}
        for j, ctx in enumerate(self.contexts):
            state = [(int(current[k]), float(block[k, TIME_IN_PHASE_AT])) for k in ctx.agents]
            user = step_prompt(ctx.layout, ctx.answer, phase_stats(ctx, block, self._n_phases), state,
                               self.meter.summary(j, 1), self.feedback.get(j, ""))
            answer = self.ask(j, user)
            if answer is None:
                continue
            for label, k in zip(ctx.answer.labels, ctx.agents, strict=True):
                actions[self._agents[k]] = int(answer[label])
                self.switches[k] += int(answer[label]) != current[k]
        return actions


def make_expert(backend: LLMBackend | None, mode: str, **options: Any) -> LLMExpert:
    """An expert of ``mode``; only the verified expert runs without a model (backend None: --no-llm)."""
    from edge_runtime.errors import RELEDError

    if mode not in MODES:
        raise RELEDError(f"unknown expert mode {mode!r}: choose {', '.join(MODES)}")
    if mode == "verified":
        from trainer.sed.verified import VerifiedExpert

        return VerifiedExpert(backend, mode, **options)
    if backend is None:
        raise RELEDError(f"{mode} mode needs a model: --no-llm works with --mode verified only")
    return (PlanExpert if mode == "plan" else StepExpert)(backend, mode, **options)
