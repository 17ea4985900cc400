"""An independent check of what a light's heads show (a conflict monitor), so a HIL run can say "0 violations"
without trusting the shield that produced the states.

It reads SUMO link states only, link by link, and knows nothing of phases or proposals:

- ``no_yellow``: a link left green for red (or a protected ``G`` became a permissive ``g``) without yellow;
- ``short_yellow``: a yellow ended before ``yellow`` seconds;
- ``short_all_red``: a link turned green less than ``all_red`` seconds after some yellow of the light ended;
- ``short_green``: a link's green ended less than ``min_green`` seconds after it began;
- ``conflict``: the links shown green are not all green in one phase of the light's program (two phases'
  movements at once).
"""

from __future__ import annotations

import math
from collections import Counter

from edge_runtime.shield import SignalTiming

EPS = 1e-6
GREEN, YELLOW = frozenset("Gg"), frozenset("yY")
VIOLATIONS = ("no_yellow", "short_yellow", "short_all_red", "short_green", "conflict")


class SignalAudit:
    """One light's shown link states over time, checked as they change."""

    def __init__(self, timing: SignalTiming, greens: tuple[str, ...], links: str, t: float):
        self.timing = timing
        self.phase_greens = [frozenset(i for i, c in enumerate(g) if c in GREEN) for g in greens]
        self.links = links
        self.since = [t] * len(links)  # when each link took its current colour
        self.yellow_ended = -math.inf
        self.violations: Counter[str] = Counter()
        self.first: dict[str, float] = {}  # kind -> simulation time of its first occurrence

    def observe(self, t: float, links: str) -> None:
        if links == self.links:
            return
        if len(links) != len(self.links):
            self._flag("no_yellow", t)  # a garbled state string: nothing about it can be trusted
            return
        timing, turned_green = self.timing, False
        for i, (a, b) in enumerate(zip(self.links, links, strict=True)):
            if a == b:
                continue
            if a in GREEN and b not in YELLOW and not (b in GREEN and not (a == "G" and b == "g")):
                self._flag("no_yellow", t)
            if a in YELLOW and b not in YELLOW:
                if t - self.since[i] < timing.yellow - EPS:
                    self._flag("short_yellow", t)
                self.yellow_ended = max(self.yellow_ended, t)
            if a in GREEN and b not in GREEN and t - self.since[i] < timing.min_green - EPS:
                self._flag("short_green", t)
            if b in GREEN and a not in GREEN:
                turned_green = True
            if not (a in GREEN and b in GREEN):  # g ↔ G keeps the green's start
                self.since[i] = t
        if turned_green and timing.all_red > 0 and t - self.yellow_ended < timing.all_red - EPS:
            self._flag("short_all_red", t)
        shown_green = {i for i, c in enumerate(links) if c in GREEN}
        if not any(shown_green <= phase for phase in self.phase_greens):
            self._flag("conflict", t)
        self.links = links

    def _flag(self, kind: str, t: float) -> None:
        self.violations[kind] += 1
        self.first.setdefault(kind, t)

    @property
    def total(self) -> int:
        return sum(self.violations.values())
