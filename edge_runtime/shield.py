"""Deterministic safety shield between a traffic-signal policy and the signal heads.

The policy only proposes the next green phase. The shield decides what is shown:
it holds every green for at least ``min_green``, inserts ``yellow`` then ``all_red``
between two different greens, and forces a change when a green reaches ``max_green``.
It is pure Python so the controller on the street and the SUMO environment run the
very same code.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

GREEN_CHARS = frozenset("Gg")


class Stage(enum.IntEnum):
    GREEN = 0
    YELLOW = 1
    ALL_RED = 2


@dataclass(frozen=True)
class SignalTiming:
    """Safety timings in seconds; defaults are RELED's default timing (yellow 3 s, all-red 2 s)."""

    yellow: float = 3.0
    all_red: float = 2.0
    min_green: float = 10.0
    max_green: float = 60.0

    def __post_init__(self) -> None:
        if not self.yellow > 0:
            raise ValueError(f"yellow must be > 0 s, got {self.yellow}")
        if self.all_red < 0:
            raise ValueError(f"all_red must be >= 0 s, got {self.all_red}")
        if not 0 < self.min_green <= self.max_green:
            raise ValueError(
                f"need 0 < min_green <= max_green, got min_green={self.min_green}, max_green={self.max_green}"
            )


@dataclass(frozen=True)
class SignalState:
    """What the signal shows: ``phase`` is the green being shown or left, ``target`` the next green."""

    stage: Stage
    phase: int
    target: int
    since: float

    @property
    def green_phase(self) -> int:
        """The green phase this state belongs to: the current one, or the one being entered."""
        return self.phase if self.stage is Stage.GREEN else self.target


class SafetyShield:
    """Turns phase proposals into a safe sequence of green, yellow and all-red stages.

    Call :meth:`propose` at decision points and :meth:`advance` at least at every
    :meth:`next_event` time; both return the stages entered, time-stamped exactly.
    """

    def __init__(self, n_phases: int, timing: SignalTiming | None = None, initial_phase: int = 0,
                 now: float = 0.0, clear_first: bool = False) -> None:
        """``clear_first``: what the heads show is unknown (a controller starting or restarting), so begin with a
        full clearance, yellow then all-red on every movement, before ``initial_phase`` turns green."""
        if n_phases < 2:
            raise ValueError(f"a shield needs at least 2 green phases to choose from, got {n_phases}")
        if not 0 <= initial_phase < n_phases:
            raise ValueError(f"initial phase {initial_phase} outside 0..{n_phases - 1}")
        self.n_phases = n_phases
        self.timing = timing or SignalTiming()
        self.state = SignalState(Stage.YELLOW if clear_first else Stage.GREEN, initial_phase, initial_phase, now)
        self.clearing = clear_first
        self._request: int | None = None
        self._request_time = now
        self.rejected_proposals = 0

    def propose(self, phase: int, now: float) -> list[SignalState]:
        """Ask for ``phase`` to be green; an index outside the phase table is counted and ignored."""
        if not 0 <= phase < self.n_phases:
            self.rejected_proposals += 1
            return self.advance(now)
        if phase != self._request:
            self._request, self._request_time = phase, now
        return self.advance(now)

    def sync(self, state: SignalState, clearing: bool = False) -> None:
        """Take over what the heads show, as a signal monitor reads it back (hardware-in-the-loop: the plant ran
        its fallback while this controller was away). A pending proposal is dropped."""
        if not (0 <= state.phase < self.n_phases and 0 <= state.target < self.n_phases):
            raise ValueError(f"shown phases {state.phase}/{state.target} outside 0..{self.n_phases - 1}")
        self.state = state
        self.clearing = clearing and state.stage is not Stage.GREEN
        self._request, self._request_time = None, state.since

    def green_elapsed(self, now: float) -> float:
        """Seconds the current green has been shown (0 while changing)."""
        return now - self.state.since if self.state.stage is Stage.GREEN else 0.0

    def min_green_met(self, now: float) -> bool:
        return self.state.stage is Stage.GREEN and self.green_elapsed(now) >= self.timing.min_green

    def next_event(self) -> float:
        """Earliest time the shown state changes without new proposals (``inf`` if none)."""
        s, t = self.state, self.timing
        if s.stage is Stage.YELLOW:
            return s.since + t.yellow
        if s.stage is Stage.ALL_RED:
            return s.since + t.all_red
        forced = s.since + t.max_green
        if self._wants_change():
            return min(forced, max(s.since + t.min_green, self._request_time))
        return forced

    def advance(self, now: float) -> list[SignalState]:
        """Apply every stage change due at or before ``now``; return the states entered, in order."""
        entered: list[SignalState] = []
        while (t_next := self.next_event()) <= now and not math.isinf(t_next):
            self.state = self._successor(t_next)
            self.clearing = self.clearing and self.state.stage is not Stage.GREEN
            entered.append(self.state)
        return entered

    def _wants_change(self) -> bool:
        return self._request is not None and self._request != self.state.phase

    def _successor(self, at: float) -> SignalState:
        s = self.state
        if s.stage is Stage.GREEN:
            target = self._request if self._wants_change() else (s.phase + 1) % self.n_phases
            return SignalState(Stage.YELLOW, s.phase, target, at)
        if s.stage is Stage.YELLOW and self.timing.all_red > 0:
            return SignalState(Stage.ALL_RED, s.phase, s.target, at)
        return SignalState(Stage.GREEN, s.target, s.target, at)


def fixed_time_choice(shield: SafetyShield, now: float, green_seconds: float) -> int:
    """The fixed-time plan a controller falls back to: each green for ``green_seconds``, in phase order."""
    s = shield.state
    if s.stage is Stage.GREEN and shield.green_elapsed(now) >= green_seconds:
        return (s.phase + 1) % shield.n_phases
    return s.green_phase


def clearance_state(greens: tuple[str, ...], stage: Stage) -> str:
    """SUMO link states of a start-up clearance: every movement that any phase makes green shows yellow, then red."""
    out = []
    for links in zip(*greens, strict=True):
        if any(c in GREEN_CHARS for c in links):
            out.append("y" if stage is Stage.YELLOW else "r")
        else:
            out.append(links[0] if links[0] in "sOo" else "r")
    return "".join(out)


def transition_state(greens: tuple[str, ...], stage: Stage, phase: int, target: int) -> str:
    """SUMO link states for a shield state.

    A link keeps its green through the change only if it keeps or gains priority (overlaps such
    as a right turn green in both phases); a protected 'G' that becomes a yielding 'g' ends with
    yellow, as in SUMO's own programs.
    """
    if stage is Stage.GREEN:
        return greens[phase]
    src, dst = greens[phase], greens[target]
    out = []
    for a, b in zip(src, dst, strict=True):
        if a in GREEN_CHARS and (a == b or b == "G"):
            out.append(a)
        elif a in GREEN_CHARS:
            out.append("y" if stage is Stage.YELLOW else "r")
        else:
            out.append(a if a in "sOo" else "r")
    return "".join(out)
