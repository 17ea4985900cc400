"""The verified expert: the LLM proposes, the simulator verifies (docs/sed.md, "Verified mode").

At every horizon the episode is saved (``TrafficSignalEnv.snapshot``) and, subset by subset, a pool of
candidate controls is played forward from that state in look-ahead workers: the classical tools
(max-pressure, greedy, the net's program, Webster from the flows the look-ahead measured, actuated
gap-out) and, unless ``--no-llm``, the LLM's timing plan and its strategy answer, which is asked after the
tools' results are known so the prompt can show them. The candidate with the best bound-aware score
G_j − λB_j over the look-ahead is executed for that subset. Subsets are chosen one after the other
against the others' current choices (coordinate-wise): each look-ahead plays the whole network, so a
subset's choice is judged with its neighbours' traffic. Every choice is recorded with where it came
from, so the demonstrations say honestly what the LLM contributed.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_runtime.errors import RELEDError
from trainer.sed.bounds import subset_score
from trainer.sed.clusters import road_graph
from trainer.sed.experts import InflowMeter, PlanExpert
from trainer.sed.lookahead import DEFAULT_TIMEOUT_S, LookaheadPool, LookaheadResult, LookaheadTask
from trainer.sed.prompts import strategy_prompt
from trainer.sed.refine import RefineConfig, agent_actor, score_subset
from trainer.sed.tools import (
    Candidate,
    LightControl,
    ToolController,
    adaptive,
    controls_name,
    strategy_candidate,
    tool_candidates,
)
from trainer.sim.net import signal_programs

if TYPE_CHECKING:
    from trainer.env import TrafficSignalEnv
    from trainer.marl.networks import Actor

log = logging.getLogger(__name__)
DEFAULT_LOOKAHEAD_WORKERS = 2
MIX_TOOLS = ("max-pressure", "greedy")  # what a single light may switch to in the per-light pass


@dataclass(frozen=True)
class Evaluated:
    """One candidate's look-ahead for one subset (score None: its look-ahead failed)."""

    candidate: Candidate
    score: float | None = None
    mean_queue: float | None = None  # vehicles queued at the subset per decision
    queued_s: float | None = None  # vehicle-seconds queued at the subset over the look-ahead
    result: LookaheadResult | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        c = self.candidate
        return {"name": c.name, "source": c.source, "score": self.score, "mean_queue": self.mean_queue,
                "queued_s": self.queued_s, "failed": self.score is None, "controls": c.describe(),
                **({"asked": c.note} if c.note else {})}


def best(evaluated: list[Evaluated]) -> Evaluated | None:
    """The highest score among candidates whose look-ahead succeeded; on a tie a tool beats the LLM (it
    would have been chosen without it) and the earlier candidate wins. None if every look-ahead failed."""
    ok = [e for e in evaluated if e.score is not None]
    if not ok:
        return None
    return max(ok, key=lambda e: (e.score, e.candidate.source == "tool", -ok.index(e)))


@dataclass
class VerifiedExpert(PlanExpert):
    """Plays the winning candidate of every subset; ``backend`` None is the no-LLM twin (tools only)."""

    lookahead_workers: int = DEFAULT_LOOKAHEAD_WORKERS
    lookahead_timeout: float = DEFAULT_TIMEOUT_S
    score_config: RefineConfig = field(default_factory=RefineConfig)
    actor: Actor | None = None  # π_θ of D_j; None: a fresh actor (what training starts from)
    state_dir: Path | None = None  # where the horizon's saved state goes; None: a temporary folder
    follow_llm: bool = False  # run the LLM's strategy whatever the look-ahead says (what the LLM alone gives)
    needs_pressure: ClassVar[bool] = True
    needs_snapshots: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pool: LookaheadPool | None = None
        self._tmp: Path | None = None

    @property
    def uses_llm(self) -> bool:
        return self.backend is not None

    def attach(self, env: TrafficSignalEnv) -> None:
        first = not self.contexts
        super().attach(env)
        if first:
            self.graph = road_graph(env.scenario.net, env.intersections)
            self.programs = signal_programs(env.scenario.net)
            self.strategy_formats = [replace(ctx.answer, mode="strategy") for ctx in self.contexts]
            if self.actor is None:
                self.actor, _ = agent_actor(None, env, self.score_config.seed)

    def reset(self, seed: int) -> None:
        super().reset(seed)
        n = len(self._agents)
        self.executor = ToolController([adaptive("max-pressure")] * n, [self.env.time] * n)
        self.executor.attach(self.env)
        self._lane_sums = [np.zeros(len(inter.in_lanes)) for inter in self.env.intersections]
        self._lane_steps = 0
        if self.pool is None:
            self.pool = LookaheadPool(self.env.config, self.lookahead_workers, self.lookahead_timeout)
            self._tmp = Path(tempfile.mkdtemp(prefix="reled-lookahead-", dir=self.state_dir))

    def close(self) -> None:
        if self.pool is not None:
            self._pool_stats = self.pool.stats
            self.pool.close()
            self.pool = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def act(self, observations: dict[str, dict[str, np.ndarray]], infos: dict[str, dict]) -> dict[str, int]:
        now = infos[self._agents[0]]["time"]
        self.meter.update(infos)
        self.window.add(self._block(observations))
        for k, agent in enumerate(self._agents):
            self._lane_sums[k] += infos[agent]["lane_arrivals"]
        self._lane_steps += 1
        if now - self.plan_start >= self.horizon_s - 1e-6:
            self._search(now)
        return self.executor.act(observations, infos)

    # -- the search ------------------------------------------------------------------------------
    def _search(self, now: float) -> None:
        assert self.pool is not None and self._tmp is not None
        try:
            snapshot = self.env.snapshot(self._tmp / "state.xml")
        except (RELEDError, OSError) as exc:  # a full disk: drive on with what runs now, counted
            self.pool.stats.snapshot_failed += 1
            log.warning("no look-ahead at %.0f s: %s; the current controls continue", now, exc)
            self.plan_start = now
            return
        delta = self.env.timing.delta
        decisions = max(1, math.ceil((min(self.horizon_s, self.env.end_time - now) - 1e-6) / delta))

        def task(controls: list[LightControl], since: list[float]) -> LookaheadTask:
            return LookaheadTask(snapshot, tuple(controls), tuple(since), decisions)

        incumbent = self.pool.run([task(self.executor.controls, self.executor.since)])[0]
        flows = self._flows(incumbent, decisions * delta)
        for j, ctx in enumerate(self.contexts):
            lights = [self.env.intersections[k] for k in ctx.agents]
            running = tuple(self.executor.controls[k] for k in ctx.agents)
            keep = Candidate(f"keep {controls_name(running)}", "tool", running, continues=True)
            pool = [Evaluated(keep)] if incumbent is None else [self._evaluate(j, keep, incumbent)]
            tools = tool_candidates(lights, self.programs, [flows[k] for k in ctx.agents], self.graph,
                                    self.env.timing)
            pool += self._run(j, tools, task, now)
            llm_first = None
            if self.uses_llm:
                llm = self._ask(j, pool, lights, [flows[k] for k in ctx.agents])
                llm_first = next((c.name for c in llm if c.name == "llm-strategy"), None)
                pool += self._run(j, llm, task, now, known=pool)
            followed = next((e for e in pool if e.candidate.name == llm_first and e.score is not None), None)
            # follow_llm: the LLM's own first choice runs (if its look-ahead worked), unverified; the rest of
            # the pool is still evaluated and recorded, so the run shows what verifying would have chosen
            winner = followed if self.follow_llm else best(pool)
            if winner is not None and not self.follow_llm:
                pool += self._mix(j, winner, task, now, pool)
                winner = best(pool)
            self._record(now, j, pool, winner, llm_first)
            if winner is None or winner.candidate is keep:
                continue  # every look-ahead failed, or nothing beat what runs now: keep it
            for k, control in zip(ctx.agents, winner.candidate.controls, strict=True):
                self.executor.set_control(k, control, now)
            incumbent = winner.result
        self.schedule.append((now, tuple(self.executor.controls)))
        self.history.append({"time": now, "subsets": [controls_name([self.executor.controls[k] for k in ctx.agents])
                                                      for ctx in self.contexts],
                             "controls": {self._agents[k]: c.describe() for k, c in enumerate(self.executor.controls)}})
        self.plan_start = now
        self.window.clear()

    def _run(self, j: int, candidates: list[Candidate], task: Any, now: float,
             known: list[Evaluated] | None = None) -> list[Evaluated]:
        """Look-ahead of each candidate for subset j, the other subsets on their current controls. A
        candidate with the same controls as one already evaluated reuses that look-ahead."""
        ctx = self.contexts[j]
        seen = {e.candidate.key: e for e in known or []}
        fresh = [c for c in dict.fromkeys(candidates) if c.key not in seen]
        tasks = []
        for candidate in fresh:
            controls, since = list(self.executor.controls), list(self.executor.since)
            for k, control in zip(ctx.agents, candidate.controls, strict=True):
                controls[k], since[k] = control, now
            tasks.append(task(controls, since))
        results = dict(zip(fresh, self.pool.run(tasks), strict=True)) if tasks else {}
        out = []
        for candidate in candidates:
            if candidate in results:
                out.append(self._evaluate(j, candidate, results[candidate]))
            else:
                twin = seen.get(candidate.key) or next(e for e in out if e.candidate.key == candidate.key)
                out.append(replace(twin, candidate=candidate))
        return out

    def _mix(self, j: int, winner: Evaluated, task: Any, now: float, known: list[Evaluated]) -> list[Evaluated]:
        """Light by light: the winner with one light switched to another adaptive tool; then every switch
        that helped, together. Subsets are groups for the LLM, not for the traffic: a light often does
        better with a different tool than its neighbours."""
        ctx = self.contexts[j]
        base = winner.candidate.controls
        singles = []
        for i in range(len(ctx.agents)):
            for tool in MIX_TOOLS:
                if base[i] != adaptive(tool):
                    controls = tuple(adaptive(tool) if m == i else c for m, c in enumerate(base))
                    singles.append(Candidate(controls_name(controls), "tool", controls))
        tried = self._run(j, singles, task, now, known)
        helped: dict[int, Evaluated] = {}
        for e in tried:
            i = next(m for m, (a, b) in enumerate(zip(e.candidate.controls, base, strict=True)) if a != b)
            if e.score is not None and e.score > (winner.score or -math.inf) and (
                    i not in helped or e.score > (helped[i].score or -math.inf)):
                helped[i] = e
        if len(helped) < 2:
            return tried
        controls = tuple(helped[i].candidate.controls[i] if i in helped else c for i, c in enumerate(base))
        mixed = Candidate(controls_name(controls), "tool", controls)
        return tried + self._run(j, [mixed], task, now, known + tried)

    def _evaluate(self, j: int, candidate: Candidate, result: LookaheadResult | None) -> Evaluated:
        """The look-ahead score G_N − λ·B_N: G_N the network's return (halting vehicles on every edge plus
        those waiting to enter, per unit of the subsets' detector capacity, like a subset's G_j), B_N the
        subsets' bounds averaged with the same weights. The whole network, because a subset must not gain
        at its neighbours' or the entries' expense (docs/sed.md says why not G_j); subset j's own queue is
        reported beside it."""
        if result is None:
            return Evaluated(candidate)
        meter = InflowMeter(self.contexts, self.env.intersections)
        for row in result.arrivals:
            meter.update({a: {"lane_arrivals": arrivals} for a, arrivals in zip(self._agents, row, strict=True)})
        assert self.actor is not None
        config = self.score_config
        scores = [score_subset(result.episode, ctx, meter.totals(i), self.actor, self.env.timing.delta, config, i)
                  for i, ctx in enumerate(self.contexts)]
        weights = np.array([ctx.capacity_vehicles for ctx in self.contexts])
        network_return = -float(result.network_halting.mean()) / weights.sum() / (1 - config.gamma)
        network_bound = float(np.dot(weights, [s.bound for s in scores]) / weights.sum())
        score = subset_score(network_return, network_bound, config.lam)
        queued = float(-result.episode.rewards[:, list(self.contexts[j].agents)].sum() * self.env.timing.delta)
        return Evaluated(candidate, score, scores[j].mean_queue, queued, result)

    def _flows(self, incumbent: LookaheadResult | None, seconds: float) -> list[np.ndarray]:
        """Arrivals per second on every incoming lane: over the coming horizon as the incumbent's look-ahead
        measured them, else over the horizon that just ended."""
        if incumbent is not None and incumbent.arrivals:
            sums = [np.sum([row[k] for row in incumbent.arrivals], axis=0) for k in range(len(self._agents))]
            return [s / seconds for s in sums]
        elapsed = max(self._lane_steps, 1) * self.env.timing.delta
        return [s / elapsed for s in self._lane_sums]

    def _ask(self, j: int, pool: list[Evaluated], lights: list, flows: list[np.ndarray]) -> list[Candidate]:
        """The LLM's proposals for subset j: its timing plan, and its strategy with the tools' results shown."""
        ctx = self.contexts[j]
        proposals = []
        plans = self.ask_plan(j)
        if plans is not None:
            proposals.append(Candidate("llm-plan", "llm", tuple(LightControl("plan", plans[label], origin="llm-plan")
                                                                for label in ctx.answer.labels)))
        evidence = evidence_text(pool, self.horizon_s)
        steps = max(1, round(self.horizon_s / self.env.timing.delta))
        demand = self.window.stats(ctx, self._n_phases) if np.isfinite(self.plan_start) else None
        user = strategy_prompt(ctx.layout, self.strategy_formats[j], demand, self.meter.summary(j, steps), evidence,
                               self.horizon_s, self.feedback.get(j, ""))
        choices = self.ask(j, user, self.strategy_formats[j])
        if choices is not None:
            proposals.append(strategy_candidate([choices[label] for label in ctx.answer.labels], lights,
                                                self.programs, flows, self.graph, self.env.timing))
        return proposals

    def _record(self, now: float, j: int, pool: list[Evaluated], winner: Evaluated | None,
                llm_first: str | None) -> None:
        first = next((e for e in pool if e.candidate.name == llm_first), None) if llm_first else None
        self.decisions.append({
            "time": now, "subset": j, "winner": winner.candidate.name if winner else None,
            "kind": winner.candidate.kind if winner else None,
            "source": winner.candidate.source if winner else None,
            "winner_queued_s": winner.queued_s if winner else None,
            "llm_first": llm_first, "llm_first_queued_s": first.queued_s if first else None,
            "candidates": [e.record() for e in pool]})

    def lookahead_stats(self) -> dict[str, Any]:
        """Look-aheads run, failed and timed out, and the wall time they took (all episodes so far)."""
        stats = self.pool.stats if self.pool else getattr(self, "_pool_stats", None)
        return asdict(stats) if stats else {}


def evidence_text(pool: list[Evaluated], horizon_s: float) -> str:
    """The tools' look-ahead results as the strategy prompt shows them."""
    measured = [f"{e.candidate.name} {e.mean_queue:.1f}" for e in pool
                if e.mean_queue is not None and not e.candidate.continues]
    return (f"Simulated next {horizon_s / 60:.0f} minutes for this group, per tool (mean queued vehicles; lower "
            f"is better): {'; '.join(measured) or 'no result'}.")


def attribution(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """Over a run: who won how often, the LLM's share, and what its own first choice would have queued."""
    won: dict[str, int] = {}
    for d in decisions:
        if d["kind"]:
            won[d["kind"]] = won.get(d["kind"], 0) + 1
    chosen = [d for d in decisions if d["winner"]]
    compared = [d for d in chosen if d["llm_first_queued_s"] is not None and d["winner_queued_s"] is not None]
    failed = sum(c["failed"] for d in decisions for c in d["candidates"])
    return {
        "choices": len(chosen), "wins": won,
        "llm_wins": sum(d["source"] == "llm" for d in chosen),
        "llm_share": sum(d["source"] == "llm" for d in chosen) / len(chosen) if chosen else 0.0,
        "llm_first_queued_s": float(sum(d["llm_first_queued_s"] for d in compared)),
        "winner_queued_s_same_choices": float(sum(d["winner_queued_s"] for d in compared)),
        "llm_first_compared": len(compared),
        "failed_lookaheads": int(failed),
    }
