"""`reled hil run`: SUMO as the street, real controller processes as the controllers, MQTT in between.

Per decision the plant sends each device its light's readings and what its heads show, waits for the
answers until a deadline, applies each answer's timed states, and runs the fixed-time plan for a light
whose device was late, silent or wrong (an event, counted). Paced at ``speed`` × real time (or as fast as
the devices answer). The report has the traffic metrics exactly as `reled eval` computes them, per-device
round-trip times, the late/missing/invalid decisions and fallbacks, the shield's interventions, the
independent audit's safety violations and the lag behind the wall-clock schedule.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.protocol import ProtocolError
from edge_runtime.rollouts import SOURCE_FALLBACK
from trainer.env import EnvConfig
from trainer.hil.bridge import Answer, PlantLink, check_fleet_folder, fleet_devices, parse_answer
from trainer.hil.plant import HilPlant, TimedState
from trainer.scenarios import get_scenario
from trainer.sim.intersections import Intersection

log = logging.getLogger(__name__)
EVENTS_KEPT = 1000  # a run with a dead device logs one event per streak, not one per decision


@dataclass(frozen=True)
class HilSettings:
    scenario: str
    fleet: Path
    speed: float | None = 10.0  # × real time; None: as fast as the devices answer
    demand: str = "moderate"
    seed: int = 0
    deadline_ms: float = 250.0  # after a request, wait this long for the answers
    fallback_green: float = 30.0  # the plant's fixed-time plan for a light without an answer: green seconds each
    episode_seconds: float | None = None  # None: the scenario's
    backend: str = "libsumo"


@dataclass
class DeviceTally:
    light: str
    answered: int = 0
    missing: int = 0  # no valid answer by the deadline (late ones included)
    late: int = 0  # of which the answer came after the deadline
    invalid: int = 0  # refused: broke the message schema, or states the light cannot show
    device_fallback: int = 0  # answered, with the device's own fixed-time plan (its policy unhealthy or absent)
    overrides: int = 0  # the device's shield did not head for the phase its policy proposed (min/max green)
    resyncs: int = 0  # the device found the heads showing other than it had planned (after a plant fallback)
    rtts: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The report's row (RTTs None for a device that never answered: JSON has no NaN)."""
        rtt = np.array(self.rtts) * 1000
        stats = {"rtt_p50_ms": float(np.percentile(rtt, 50)), "rtt_p99_ms": float(np.percentile(rtt, 99)),
                 "rtt_max_ms": float(rtt.max())} if len(rtt) else dict.fromkeys(("rtt_p50_ms", "rtt_p99_ms",
                                                                                  "rtt_max_ms"))
        return {"light": self.light, "answered": self.answered, "missing": self.missing, "late": self.late,
                "invalid": self.invalid, "device_fallback": self.device_fallback, "overrides": self.overrides,
                "resyncs": self.resyncs, **stats}


@dataclass
class Streak:
    """A device failing the same way over consecutive decisions: one event, not one per decision."""

    device: str
    kind: str  # missing, late, invalid
    first_t: float
    last_t: float
    decisions: int
    detail: str


@dataclass
class HilReport:
    settings: dict[str, Any]
    devices: dict[str, dict[str, Any]]
    undriven: list[str]  # lights of the scenario no device drives: the plant's fixed-time plan runs them
    metrics: dict[str, float]
    decisions: int
    wall_seconds: float
    lag_ms: dict[str, float]
    violations: dict[str, dict[str, int]]  # light -> kind -> count (the independent audit)
    events: list[dict[str, Any]]
    events_dropped: int  # streaks beyond EVENTS_KEPT
    timeline: dict[str, list[float]]  # per decision: t, wall_s, queued, lag_ms, rtt_max_ms, answered, fallbacks

    @property
    def total_violations(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.violations.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_violations": self.total_violations}


class Tracker:
    """Tallies, fault streaks and the timeline as the run goes."""

    def __init__(self, devices: dict[str, str]):
        self.tallies = {device: DeviceTally(light) for light, device in devices.items()}
        self.open: dict[str, Streak] = {}
        self.events: list[Streak] = []
        self.dropped_events = 0
        self.timeline: dict[str, list[float]] = {"t": [], "wall_s": [], "queued": [], "lag_ms": [],
                                                 "rtt_max_ms": [], "answered": [], "fallbacks": []}

    def states(self, device: str, answers: dict[str, Answer], refused: dict[str, str], t: float, until: float,
               inter: Intersection, deadline_ms: float) -> list[TimedState] | None:
        """The states ``device`` answered this decision with, or None when it has none to apply (missing, or
        refused: counted, and its light runs the plant's plan)."""
        answer = answers.get(device)
        if answer is None:
            detail = refused.get(device) or f"no answer within {deadline_ms:g} ms"
            self.failed(device, "invalid" if device in refused else "missing", t, detail)
            return None
        try:
            states = parse_answer(answer.document, t, until, inter)
        except ProtocolError as exc:
            self.failed(device, "invalid", t, str(exc))
            return None
        self.answered(device, answer)
        return states

    def answered(self, device: str, answer: Answer) -> None:
        tally, doc = self.tallies[device], answer.document
        tally.answered += 1
        tally.rtts.append(answer.rtt)
        tally.device_fallback += doc["source"] == SOURCE_FALLBACK
        tally.overrides += doc["override"]
        tally.resyncs += doc["resync"]
        self.open.pop(device, None)

    def failed(self, device: str, kind: str, t: float, detail: str) -> None:
        tally = self.tallies[device]
        if kind == "invalid":
            tally.invalid += 1
        else:
            tally.missing += 1
        streak = self.open.get(device)
        if streak is not None and streak.kind == kind:
            streak.last_t, streak.decisions = t, streak.decisions + 1
            return
        streak = Streak(device, kind, t, t, 1, detail)
        self.open[device] = streak
        log.info("HIL: %s %s at t=%.0f (%s): fixed-time plan for its light", device, kind, t, detail)
        if len(self.events) < EVENTS_KEPT:
            self.events.append(streak)
        else:
            self.dropped_events += 1


def run_hil(settings: HilSettings, progress: Callable[[float], None] | None = None) -> HilReport:
    """One HIL episode against the devices of ``settings.fleet`` (started with `reled-edge fleet up --hil`)."""
    if settings.speed is not None and settings.speed <= 0:
        raise RELEDError(f"--speed must be > 0 (or max), got {settings.speed}")
    if settings.deadline_ms <= 0:
        raise RELEDError(f"--deadline-ms must be > 0, got {settings.deadline_ms}")
    check_fleet_folder(settings.fleet)
    scenario = get_scenario(settings.scenario)
    scenario.demand(settings.demand)
    scenario.check_files()
    plant = HilPlant(EnvConfig(scenario=settings.scenario, demand=settings.demand, backend=settings.backend,
                               episode_seconds=settings.episode_seconds), resolved=scenario)
    link: PlantLink | None = None
    try:
        devices = fleet_devices(settings.fleet, plant.intersections, plant.signal_timing)
        link = PlantLink(settings.fleet, f"hil-{uuid.uuid4().hex[:12]}")
        return _drive(plant, link, devices, settings, progress)
    finally:
        if link is not None:
            link.close()
        plant.close()


def _drive(plant: HilPlant, link: PlantLink, devices: dict[str, str], settings: HilSettings,
           progress: Callable[[float], None] | None) -> HilReport:
    plant.reset(settings.seed)
    tracker = Tracker(devices)
    lights = [(k, inter, devices.get(inter.tls_id)) for k, inter in enumerate(plant.intersections)]
    expected = {device for device in devices.values()}
    begin, end = plant.time, plant.end_time
    start = time.perf_counter()
    lags: list[float] = []
    seq = 0
    while not plant.done:
        t, until = plant.time, plant.next_time()
        lag = 0.0
        if settings.speed is not None:
            scheduled = start + (t - begin) / settings.speed
            if (wait := scheduled - time.perf_counter()) > 0:
                time.sleep(wait)
            lag = max(0.0, time.perf_counter() - scheduled)
        lags.append(lag)
        for k, _inter, device in lights:
            if device is not None:
                link.request(device, seq, t, until, plant.detector_readings(k), plant.shown(k))
        answers, refused = link.gather(seq, expected, time.perf_counter() + settings.deadline_ms / 1000)
        fallbacks = 0
        for k, inter, device in lights:
            states = None if device is None else \
                tracker.states(device, answers, refused, t, until, inter, settings.deadline_ms)
            if states is None:
                plant.fallback(k, settings.fallback_green)
                fallbacks += 1
            else:
                plant.apply(k, states)
        rtts = [a.rtt for a in answers.values()]
        timeline = tracker.timeline
        timeline["t"].append(t)
        timeline["wall_s"].append(time.perf_counter() - start)
        timeline["answered"].append(len(lights) - fallbacks)
        timeline["queued"].append(plant.queued())
        timeline["lag_ms"].append(lag * 1000)
        timeline["rtt_max_ms"].append(max(rtts) * 1000 if rtts else None)
        timeline["fallbacks"].append(fallbacks)
        plant.advance()
        seq += 1
        if progress is not None:
            progress((plant.time - begin) / (end - begin))
    wall = time.perf_counter() - start
    for device, late in link.late.items():
        tracker.tallies[device].late = late
    lag_ms = np.array(lags) * 1000
    assert plant.last_metrics is not None
    return HilReport(
        settings={**asdict(settings), "fleet": str(settings.fleet), "speed": settings.speed or "max"},
        devices={device: tally.summary() for device, tally in tracker.tallies.items()},
        undriven=[inter.tls_id for _k, inter, device in lights if device is None],
        metrics=plant.last_metrics.as_dict(), decisions=seq, wall_seconds=wall,
        lag_ms={"p50": float(np.percentile(lag_ms, 50)), "p99": float(np.percentile(lag_ms, 99)),
                "max": float(lag_ms.max())},
        violations={inter.tls_id: dict(plant.audits[k].violations) for k, inter, _d in lights
                    if plant.audits[k].total},
        events=[asdict(e) for e in tracker.events], events_dropped=tracker.dropped_events, timeline=timeline)
