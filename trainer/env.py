"""PettingZoo ParallelEnv over SUMO: one agent per controlled traffic light.

Actions propose a green phase; the shared safety shield (``edge_runtime.shield``) turns them
into green/yellow/all-red with min and max green. SUMO is advanced event to event (a decision,
the end of a yellow...), never second by second, and lanes are read once per decision.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from edge_runtime.errors import RELEDError
from edge_runtime.features import (
    CURRENT_PHASE_AT,
    DETECTOR_RANGE_M,
    MAX_PHASES,
    MIN_GREEN_MET_AT,
    TIME_IN_PHASE_AT,
    action_mask,
    feature_size,
)
from edge_runtime.shield import SafetyShield, Stage
from trainer.scenarios import DecisionTiming, Scenario, get_scenario
from trainer.sim.intersections import Intersection, discover_intersection
from trainer.sim.metrics import EpisodeMetrics, read_episode_metrics
from trainer.sim.phase_readings import PhaseReadings
from trainer.sim.simulation import Backend, EpisodeOutputs, Simulation, sumo_command

log = logging.getLogger(__name__)

RewardName = Literal["queue", "wait", "pressure"]
REWARDS: tuple[str, ...] = ("queue", "wait", "pressure")


@dataclass(frozen=True)
class EnvConfig:
    """Everything that defines an episode (timing: the scenario's, RELED's default timing unless it sets one)."""

    scenario: str = "grid2x2"
    demand: str = "moderate"
    reward: RewardName = "queue"
    backend: Backend = "libsumo"
    timing: DecisionTiming | None = None  # None: the scenario's own (RELED's default timing unless it sets one)
    episode_seconds: float | None = None  # None: the scenario's begin..end
    detector_range: float = DETECTOR_RANGE_M
    time_to_teleport: float = 300.0
    fixed_time: bool = False  # the net's own programs run; actions are ignored
    with_pressure: bool = False  # put per-phase pressure in infos (max-pressure needs it)
    with_inflow: bool = False  # put per-lane arrivals in infos (the LLM expert's inflow meter needs them)
    snapshots: bool = False  # allow snapshot()/restore(): look-ahead simulations from any decision
    collect_metrics: bool = True
    gui: bool = False
    sumo_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise RELEDError(f"unknown reward {self.reward!r}: choose one of {', '.join(REWARDS)}")
        if self.episode_seconds is not None and self.episode_seconds <= 0:
            raise RELEDError(f"episode length must be > 0 s, got {self.episode_seconds}")


# SUMO options that make a saved state exact: every route loaded up front (a started SUMO reads route files
# ahead incrementally and its reader cannot rewind, so a state loaded into a running SUMO gains and loses
# vehicles), random number generators saved, values to 17 decimals. The episode's arrived vehicles are kept
# (--keep-after-arrival, added per episode): with a demand --scale above 1 SUMO's copies share the route of
# their original, and once the original had arrived the saved state lacked that route and could not be
# loaded (seen on cologne8 congested). None of these change trajectories (checked: same delays).
SNAPSHOT_ARGS = ("--route-steps", "0", "--save-state.rng", "true", "--save-state.precision", "17")


@dataclass(frozen=True)
class Snapshot:
    """Everything needed to continue an episode from one decision in another process: SUMO's saved state
    plus the environment's own (shields, lane arrivals seen so far)."""

    state_file: Path
    time: float
    seed: int
    shields: tuple[SafetyShield, ...]
    seen: tuple[frozenset[str], ...]


class TrafficSignalEnv(ParallelEnv):
    metadata: ClassVar[dict[str, Any]] = {"name": "reled_traffic_signals_v1", "render_modes": []}

    def __init__(self, config: EnvConfig | None = None, *, resolved: Scenario | None = None,
                 **overrides: Any):
        self.config = replace(config or EnvConfig(), **overrides)
        self.scenario = resolved or get_scenario(self.config.scenario)
        self.scenario.demand(self.config.demand)
        self.scenario.check_files()
        self.timing = self.config.timing or self.scenario.timing
        self.end_time = self.scenario.begin + (self.config.episode_seconds or
                                               self.scenario.end - self.scenario.begin)
        self.sim = Simulation(self.config.backend)
        self._tmp = Path(tempfile.mkdtemp(prefix="reled-env-"))
        self._outputs = EpisodeOutputs(self._tmp / "tripinfo.xml", self._tmp / "statistics.xml")
        self.intersections = self._discover()
        self.possible_agents = [i.tls_id for i in self.intersections]
        self.agents: list[str] = []
        n_obs = feature_size()
        self._obs_space = spaces.Dict({
            "observation": spaces.Box(0.0, np.inf, (n_obs,), np.float32),
            "action_mask": spaces.Box(0, 1, (MAX_PHASES,), np.int8),
        })
        self._act_space = spaces.Discrete(MAX_PHASES)
        self._masks = {i.tls_id: action_mask(i.n_phases).astype(np.int8) for i in self.intersections}
        self._episode = 0
        self.readings: PhaseReadings | None = None
        self.last_metrics: EpisodeMetrics | None = None
        self.invalid_actions = 0

    # -- PettingZoo API -------------------------------------------------------------------------
    def observation_space(self, agent: str) -> spaces.Space:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Space:
        return self._act_space

    def reset(self, seed: int | None = None, options: dict | None = None):
        seed = self._episode if seed is None else seed
        self._episode += 1
        self._start(seed)
        self.agents = list(self.possible_agents)
        self.invalid_actions = 0
        obs = self._observe()
        return obs, self._infos()

    def step(self, actions: dict[str, int]):
        if not self.agents:
            raise RELEDError("step() called on a finished episode: call reset() first")
        now = self.time
        try:
            if not self.config.fixed_time:
                for k, inter in enumerate(self.intersections):
                    action = actions.get(inter.tls_id)
                    if action is None:
                        continue
                    if not 0 <= int(action) < inter.n_phases:
                        self.invalid_actions += 1
                        continue
                    self.shields[k].propose(int(action), now)
                self._apply_signals()
            self._advance_to(min(now + self.timing.delta, self.end_time))
            obs = self._observe()
            rewards = self._rewards()
            infos = self._infos()
        except self.sim.sumo_errors as exc:  # SUMO died between two calls (TraCI: its process was killed)
            raise self.sim.guard(exc) from exc
        done = self.time >= self.end_time - 1e-6
        if done:
            self._finish_episode(infos)
        terminations = dict.fromkeys(obs, False)
        truncations = dict.fromkeys(obs, done)
        return obs, rewards, terminations, truncations, infos

    def snapshot(self, state_file: Path) -> Snapshot:
        """Save the running episode at this decision (SUMO's state to ``state_file``)."""
        if not self.config.snapshots:
            raise RELEDError("this environment was not built for snapshots: set EnvConfig(snapshots=True)")
        if not self.agents:
            raise RELEDError("snapshot() needs a running episode: call reset() first")
        try:
            self.api.simulation.saveState(str(state_file))
        except self.sim.sumo_errors as exc:
            raise RELEDError(f"SUMO could not save its state to {state_file} ({exc})") from exc
        return Snapshot(Path(state_file), self._time, self._seed, tuple(copy.deepcopy(self.shields)),
                        tuple(frozenset(s) for s in self.readings.lanes.seen))

    def restore(self, snapshot: Snapshot) -> tuple[dict, dict]:
        """Start SUMO from a snapshot (of this scenario and settings) and continue the episode from there:
        the same vehicles, signals and random state, so the same controls give the same traffic."""
        if not self.config.snapshots:
            raise RELEDError("this environment was not built for snapshots: set EnvConfig(snapshots=True)")
        self._start(snapshot.seed, load_state=snapshot.state_file)
        self._time = snapshot.time
        self.shields = list(copy.deepcopy(snapshot.shields))
        self._shown = [None] * len(self.intersections)
        self._apply_signals()
        self.readings.lanes.seen = [set(s) for s in snapshot.seen]
        self.readings.read()
        self.agents = list(self.possible_agents)
        self.invalid_actions = 0
        return self._observe(), self._infos()

    def close(self) -> None:
        self.sim.close()
        self.agents = []
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __del__(self) -> None:
        if getattr(self, "sim", None) is not None:
            self.sim.close()

    # -- simulation ----------------------------------------------------------------------------
    @property
    def time(self) -> float:
        return self._time

    def _command(self, seed: int, with_outputs: bool, gui: bool = False, load_state: Path | None = None) -> list[str]:
        extra = self.config.sumo_args
        if self.config.snapshots:
            keep_s = int(self.end_time - self.scenario.begin) + 1
            extra = (*extra, *SNAPSHOT_ARGS, "--keep-after-arrival", str(keep_s))
        if load_state is not None:
            extra = (*extra, "--load-state", str(load_state))
        return sumo_command(self.scenario, self.config.demand, seed,
                            self._outputs if with_outputs else None, end=self.end_time, gui=gui,
                            time_to_teleport=self.config.time_to_teleport, extra=extra)

    def _discover(self) -> list[Intersection]:
        api = self.sim.start(self._command(0, with_outputs=False))
        try:
            wanted = self.scenario.controlled
            ids = list(api.trafficlight.getIDList())
            missing = sorted(set(wanted or ()) - set(ids))
            if missing:
                raise RELEDError(f"scenario {self.scenario.name} lists lights {missing} that its net lacks; "
                                 "re-import the scenario")
            found = [discover_intersection(api, tls) for tls in (wanted or ids)]
        finally:
            self.sim.close()
        intersections = [i for i in found if i is not None]
        if not intersections:
            raise RELEDError(f"scenario {self.scenario.name} has no traffic light with 2+ green phases to control")
        return intersections

    def _start(self, seed: int, load_state: Path | None = None) -> None:
        self._seed = seed
        self._restored = load_state is not None  # a continued episode has no trip outputs of its own
        self.api = self.sim.start(self._command(seed, self.config.collect_metrics and load_state is None,
                                                self.config.gui, load_state))
        self._time = float(self.api.simulation.getTime())
        if self.readings is None:
            self._build_readings()
        self.readings.attach(self.api)
        self._last_program_phase = [0] * len(self.intersections)
        self.shields = [SafetyShield(i.n_phases, self.timing, 0, self._time) for i in self.intersections]
        self._shown: list[str | None] = [None] * len(self.intersections)
        n = len(self.intersections)
        self._green_phase = np.zeros(n, dtype=np.intp)
        self._green = np.zeros(n, dtype=bool)
        self._green_since = np.zeros(n)
        if not self.config.fixed_time:
            self._apply_signals()
        self.readings.read()

    def _build_readings(self) -> None:
        """Detectors and index arrays: built once per net, on the first episode."""
        self.readings = PhaseReadings(self.api, self.intersections, self.config.detector_range,
                                      count_arrivals=self.config.with_inflow)
        self._obs_block = np.zeros((len(self.intersections), feature_size()), dtype=np.float32)
        self._agent_range = np.arange(len(self.intersections))
        self._agent_masks = [(i.tls_id, self._masks[i.tls_id]) for i in self.intersections]

    def _advance_to(self, target: float) -> None:
        """Step SUMO through every shield event up to ``target``, switching signals on time."""
        if self.config.fixed_time:
            self.sim.step_to(target)
            self._time = target
        else:
            shields = self.shields
            events = [s.next_event() for s in shields]
            while True:
                event = min(min(events), target)
                self.sim.step_to(event)
                self._time = event
                due = [k for k, t in enumerate(events) if t <= event]
                for k in due:
                    shields[k].advance(event)
                    events[k] = shields[k].next_event()
                self._apply_signals(due)
                if event >= target:
                    break
        self.readings.read()

    def _apply_signals(self, which: list[int] | range | None = None) -> None:
        """Send the states of the given lights (default: all) to SUMO where they changed, and keep
        the shield states the observation needs in arrays."""
        set_state = self.api.trafficlight.setRedYellowGreenState
        for k in range(len(self.intersections)) if which is None else which:
            inter, shield_state = self.intersections[k], self.shields[k].state
            state = self._signal_string(k)
            if state != self._shown[k]:
                set_state(inter.tls_id, state)
                self._shown[k] = state
            self._green_phase[k] = shield_state.green_phase
            self._green[k] = shield_state.stage is Stage.GREEN
            self._green_since[k] = shield_state.since

    def _signal_string(self, k: int) -> str:
        """The SUMO link states light ``k`` shows (a hardware-in-the-loop plant shows what its controller sent)."""
        return self.intersections[k].state_string(self.shields[k].state)

    def _finish_episode(self, infos: dict[str, dict]) -> None:
        self.sim.close()
        self.agents = []
        if self.config.collect_metrics and not self._restored:
            self.last_metrics = read_episode_metrics(self._outputs.tripinfo, self._outputs.statistics)
            episode = {**self.last_metrics.as_dict(), "invalid_actions": self.invalid_actions}
            for info in infos.values():
                info["episode"] = episode

    # -- observation, reward -------------------------------------------------------------------
    def _observe(self) -> dict[str, dict[str, np.ndarray]]:
        """All agents' vectors at once: one matrix product per feature over every served lane."""
        block, agents = self._obs_block, self._agent_range
        block.fill(0.0)
        self.readings.fill(block)
        if self.config.fixed_time:
            phases = np.array([self._program_phase(k) for k in agents])
            block[:, MIN_GREEN_MET_AT] = 1.0
        else:
            phases = self._green_phase
            elapsed = np.where(self._green, self._time - self._green_since, 0.0)
            block[:, TIME_IN_PHASE_AT] = elapsed
            block[:, MIN_GREEN_MET_AT] = self._green & (elapsed >= self.timing.min_green)
        block[agents, CURRENT_PHASE_AT + phases] = 1.0
        vectors = block.copy()  # rows stay valid after the next decision refills the block
        return {tls: {"observation": vectors[k], "action_mask": mask}
                for k, (tls, mask) in enumerate(self._agent_masks)}

    def _program_phase(self, k: int) -> int:
        """Green phase the net's own program shows (fixed-time mode); the last green during changes."""
        inter = self.intersections[k]
        state = self.api.trafficlight.getRedYellowGreenState(inter.tls_id)
        if state in inter.green_states:
            self._last_program_phase[k] = inter.green_states.index(state)
        return self._last_program_phase[k]

    def _rewards(self) -> dict[str, float]:
        """Per agent, from its incoming lanes: minus queued vehicles, waiting seconds or |pressure|."""
        reward, readings = self.config.reward, self.readings
        if reward == "queue":
            values = -readings.queued()
        elif reward == "wait":
            values = -readings.waiting()
        else:
            values = -readings.intersection_pressure()
        return dict(zip(self.possible_agents, values.tolist(), strict=True))

    def _infos(self) -> dict[str, dict]:
        pressures = self.readings.pressures() if self.config.with_pressure else None
        infos = {}
        for k, inter in enumerate(self.intersections):
            info: dict[str, Any] = {"action_mask": self._masks[inter.tls_id], "time": self._time}
            if pressures is not None:
                info["phase_pressure"] = pressures[k]
            if self.config.with_inflow:
                info["lane_arrivals"] = self.readings.arrivals(k)
            infos[inter.tls_id] = info
        return infos
