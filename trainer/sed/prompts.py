"""Prompt text for the two expert modes. Versioned: a demonstration records the version that made it.

Order matters for speed: the instructions (same for every subset) come first, then the subset's
layout and the answer example (same at every call of that subset), then what changes. With prefix
reuse, llama.cpp evaluates only the changing tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.shield import SignalTiming
from trainer.sed.answers import AnswerFormat
from trainer.sed.layout import SubsetLayout

PROMPT_VERSIONS = {"plan": "plan/1", "step": "step/1", "strategy": "strategy/1", "verified": "plan/1+strategy/1"}


@dataclass(frozen=True)
class PhaseStats:
    """Per light: per phase (queue, approaching, longest wait) as the prompt reports them."""

    label: str
    values: np.ndarray  # [n_phases, 3]


def system_prompt(mode: str, timing: SignalTiming) -> str:
    change = f"{timing.yellow:g} s yellow and {timing.all_red:g} s all-red"
    if mode == "strategy":
        return ("You are a traffic signal engineer. For each intersection of a group of neighbouring signalised "
                "intersections, choose how it is controlled for the next period, with one of these tools: "
                "max-pressure (serve the phase with the most vehicles upstream minus downstream); greedy (serve "
                "the longest queue); program (the intersection's own fixed-time program); webster (a fixed-time "
                "plan with a cycle of `cycle` seconds, greens in proportion to the measured flows, offsets along "
                "the main road for a green wave); actuated (hold a green while vehicles keep arriving, at least "
                "min_green and at most max_green seconds). favour is a phase to give more green, or -1 for none. "
                f"Each change of phase shows {change}. You are shown the simulated result of each tool for this "
                "group over the next period (fewer queued vehicles is better): use that evidence, and mix tools "
                "between intersections where the evidence suggests it. Answer with JSON only.")
    if mode == "plan":
        return ("You are a traffic signal engineer. You write fixed-time timing plans for a group of neighbouring "
                "signalised intersections. For each intersection give: order, the sequence of its phases (each "
                f"phase once); green, the green seconds of each phase in that order ({timing.min_green:g} to "
                f"{timing.max_green:g}); offset, seconds that shift its cycle so that platoons from a neighbour "
                f"arrive on green. Each change of phase shows {change}. Give more green to phases with longer "
                "queues, keep cycles short when traffic is light, and line up offsets along busy routes. "
                "Answer with JSON only.")
    return ("You are a traffic signal controller for a group of neighbouring signalised intersections. Every "
            f"{timing.min_green:g} s or so you choose, for each intersection, the phase to show green next. "
            f"Changing phase costs {change}. Serve the phase with the most queued and approaching vehicles, "
            "do not starve a phase with a long wait, and avoid switching back and forth. Answer with JSON only.")


def layout_text(layout: SubsetLayout) -> str:
    lines = ["Intersections and the movements each phase serves:"]
    for light in layout.lights:
        lines.append(f"{light.label}:")
        lines += [f"  phase {p}: {movements or 'no movement'}" for p, movements in enumerate(light.phases)]
    if layout.links:
        lines.append("Road distances: " + "; ".join(f"{a}-{b} {m:.0f} m" for a, b, m in layout.links) + ".")
    return "\n".join(lines)


STEP_COLUMNS = ("Live state, one row per intersection: label | phase shown, seconds shown | queued vehicles per "
                "phase | approaching vehicles per phase | longest wait per phase (s). Phase 0 comes first.")


def stats_text(stats: list[PhaseStats], digits: int) -> str:
    """Per light, one line of per-phase numbers (phase 0 first). Plain space-separated numbers: " 6" is
    one token where "[6," is two, and in step mode these tokens change at every call."""
    return "\n".join(f"{light.label}: queue {_numbers(light.values[:, 0], digits)}; approaching "
                     f"{_numbers(light.values[:, 1], digits)}; longest wait {_numbers(light.values[:, 2], 0)} s"
                     for light in stats)


def state_rows(stats: list[PhaseStats], current: list[tuple[int, float]]) -> str:
    """Step mode's table rows (the column names are in the cached part of the prompt)."""
    return "\n".join(f"{light.label} | {phase} {seconds:.0f} | {_numbers(light.values[:, 0], 0)} | "
                     f"{_numbers(light.values[:, 1], 0)} | {_numbers(light.values[:, 2], 0)}"
                     for light, (phase, seconds) in zip(stats, current, strict=True))


def _numbers(values: np.ndarray, digits: int) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def plan_prompt(layout: SubsetLayout, answer: AnswerFormat, demand: list[PhaseStats] | None,
                inflow: str, horizon_s: float, feedback: str) -> str:
    parts = [layout_text(layout), f"Answer in this form: {answer.example()}"]
    if demand is None:
        parts.append("No measurements yet: this is the start of the period.")
    else:
        parts.append(f"Traffic over the last {horizon_s / 60:.0f} minutes, per phase (mean vehicles per decision):")
        parts.append(stats_text(demand, 1))
    parts.append(inflow)
    if feedback:
        parts.append(feedback)
    parts.append(f"Write the plan for the next {horizon_s / 60:.0f} minutes.")
    return "\n".join(parts)


def strategy_prompt(layout: SubsetLayout, answer: AnswerFormat, demand: list[PhaseStats] | None, inflow: str,
                    evidence: str, horizon_s: float, feedback: str) -> str:
    """Layout and answer form (cached), then the demand of the last period and the tools' look-ahead results."""
    parts = [layout_text(layout), f"Answer in this form: {answer.example()}"]
    if demand is not None:
        parts.append(f"Traffic over the last {horizon_s / 60:.0f} minutes, per phase (mean vehicles per decision):")
        parts.append(stats_text(demand, 1))
    parts += [inflow, evidence]
    if feedback:
        parts.append(feedback)
    parts.append(f"Choose a tool for each intersection for the next {horizon_s / 60:.0f} minutes.")
    return "\n".join(parts)


def step_prompt(layout: SubsetLayout, answer: AnswerFormat, now: list[PhaseStats], current: list[tuple[int, float]],
                inflow: str, feedback: str) -> str:
    parts = [layout_text(layout), f"Answer in this form: {answer.example()}"]
    if feedback:
        parts.append(feedback)
    # everything above is the same at every call of this subset (prefix cache); below changes
    parts += ["Which phase should each intersection show next?", STEP_COLUMNS, state_rows(now, current), inflow]
    return "\n".join(parts)


def messages(mode: str, timing: SignalTiming, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt(mode, timing)}, {"role": "user", "content": user}]
