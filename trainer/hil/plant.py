"""The street of a hardware-in-the-loop run: SUMO, advanced one decision at a time, each light showing the
timed states its controller sent (or, when the controller is late, missing or wrong, the fixed-time plan the
plant runs for it), every state checked by an independent :class:`SignalAudit`.

The environment's machinery does the work (lanes read once per decision, SUMO stepped event to event, trip
metrics at the end), so the readings a controller gets and the metrics a run reports are exactly those of
`reled eval`; only who decides what the heads show differs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.features import per_phase_values
from edge_runtime.shield import SafetyShield, SignalState, SignalTiming, fixed_time_choice
from trainer.env import TrafficSignalEnv
from trainer.hil.audit import SignalAudit


@dataclass(frozen=True)
class TimedState:
    """A state a light enters at ``state.since``, with the SUMO link states it shows."""

    state: SignalState
    clearing: bool
    links: str


@dataclass
class LightProgram:
    """What one light shows during a step, in the role the env gives a shield: ``next_event``/``advance``."""

    state: SignalState
    clearing: bool
    links: str
    queue: deque[TimedState] = field(default_factory=deque)

    def load(self, states: list[TimedState]) -> None:
        self.queue = deque(states)

    def next_event(self) -> float:
        return self.queue[0].state.since if self.queue else math.inf

    def advance(self, now: float) -> None:
        while self.queue and self.queue[0].state.since <= now:
            entered = self.queue.popleft()
            self.state, self.clearing, self.links = entered.state, entered.clearing, entered.links


class HilPlant(TrafficSignalEnv):
    """The simulation side of a HIL run. ``reset``, then per decision: :meth:`detector_readings`, :meth:`shown`,
    each light's states (:meth:`apply` or :meth:`fallback`), :meth:`advance`; ``last_metrics`` at the end."""

    def reset(self, seed: int | None = None, options: dict | None = None):
        out = super().reset(seed, options)
        shields = self.shields
        self.shields = [LightProgram(s.state, False, inter.state_string(s.state))  # type: ignore[misc]
                        for s, inter in zip(shields, self.intersections, strict=True)]
        self.programs: list[LightProgram] = self.shields  # type: ignore[assignment]
        self.audits = [SignalAudit(self.signal_timing, inter.green_states, p.links, self.time)
                       for p, inter in zip(self.programs, self.intersections, strict=True)]
        self._vectors = np.stack([out[0][a]["observation"] for a in self.possible_agents])
        return out

    @property
    def signal_timing(self) -> SignalTiming:
        """The scenario's timing as a controller's device file states it (without the decision interval)."""
        return SignalTiming(self.timing.yellow, self.timing.all_red, self.timing.min_green, self.timing.max_green)

    @property
    def done(self) -> bool:
        return self.time >= self.end_time - 1e-6

    def next_time(self) -> float:
        return min(self.time + self.timing.delta, self.end_time)

    def detector_readings(self, k: int) -> np.ndarray:
        """Light ``k``'s per-phase (queue, approaching, longest wait), as the env's observation has them."""
        return per_phase_values(self._vectors[k], self.intersections[k].n_phases)

    def shown(self, k: int) -> TimedState:
        program = self.programs[k]
        return TimedState(program.state, program.clearing, program.links)

    def apply(self, k: int, states: list[TimedState]) -> None:
        self.programs[k].load(states)

    def fallback(self, k: int, green_seconds: float) -> list[TimedState]:
        """The fixed-time plan for this step, from what light ``k`` shows now (so the change stays safe)."""
        inter, shown = self.intersections[k], self.programs[k]
        shield = SafetyShield(inter.n_phases, self.signal_timing)
        shield.sync(shown.state, shown.clearing)
        now, until = self.time, math.nextafter(self.next_time(), -math.inf)
        states = [*shield.propose(fixed_time_choice(shield, now, green_seconds), now), *shield.advance(until)]
        timed = [TimedState(s, False, inter.state_string(s)) for s in states]
        self.apply(k, timed)
        return timed

    def advance(self) -> None:
        """Run SUMO to the next decision (every light switching on time); at the end, the episode's metrics."""
        self._advance_to(self.next_time())
        self._vectors = np.stack([v["observation"] for v in self._observe().values()])
        if self.done:
            self._finish_episode({})

    def queued(self) -> float:
        """Halting vehicles on every controlled approach now (the run's congestion over time)."""
        return float(self.readings.queued().sum())

    def _signal_string(self, k: int) -> str:
        program = self.shields[k]
        if not isinstance(program, LightProgram):  # while the env starts an episode, before reset hands over
            return super()._signal_string(k)
        self.audits[k].observe(self.time, program.links)
        return program.links
