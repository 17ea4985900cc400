"""Hardware-in-the-loop: a controller whose street is a simulation (`reled hil run`), reached over MQTT.

The daemon runs exactly the code it runs on the street (features, ONNX policy, shield, fallback plan,
outbox); only its sensor, actuator and clock come from here. The plant (SUMO) drives time: at each
decision it sends ``hil/obs`` with the simulation time ``t``, the time of its next request ``until``,
the per-phase detector readings, and what the heads show now (the signal monitor's reading back). The
controller adopts a shown state that differs from its own (the plant ran its fallback while this
controller was away or late), decides at ``t``, and answers on ``hil/act`` with every signal state its
shield enters in ``[t, until)``, each stamped with its simulation time, which the plant applies on time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from edge_runtime.mqtt import Link
from edge_runtime.protocol import ProtocolError, decode_json, device_topic, encode
from edge_runtime.schema import HIL_OBS, validate
from edge_runtime.shield import SafetyShield, SignalState, Stage

log = logging.getLogger(__name__)
HIL_QOS = 0  # a late answer is useless: the plant has run its fallback already, so nothing is queued or resent
# the longest a request may ask the shield to cover, from the shown state's start to `until`: a hostile or broken
# plant must not make the controller plan (and buffer) hours of states
MAX_SPAN = 600.0


@dataclass(frozen=True)
class PlantRequest:
    run: str
    seq: int
    t: float
    until: float  # plan the signal up to (not including) this time: the plant's next request
    reading: np.ndarray  # [n_phases, 3]
    shown: SignalState
    clearing: bool


def shown_state(document: dict) -> tuple[SignalState, bool]:
    """A validated ``shown`` object as a shield state and its clearing flag."""
    return (SignalState(Stage(document["stage"]), document["phase"], document["target"], document["since"]),
            document["clearing"])


class PlantClock:
    """Signal time is the simulation's: the time of the plant's latest request."""

    def __init__(self) -> None:
        self.t = 0.0

    def restart(self) -> None:
        """Nothing to do: time starts with the plant's first request."""

    def now(self) -> float:
        return self.t

    def wall_until(self, t: float) -> float:
        """Wait for the plant's next message (the loop still wakes up now and then for its housekeeping)."""
        return 0.05


class HilBridge:
    """The sensor and the actuator of a controller in a HIL run: readings come from ``hil/obs``, the states the
    shield enters go back on ``hil/act``."""

    def __init__(self, link: Link, device: str, n_phases: int):
        self.link = link
        self.clock = PlantClock()
        self.device = device
        self.n_phases = n_phases
        self.pending: PlantRequest | None = None
        self.request: PlantRequest | None = None  # the one being answered
        self.states: list[dict] = []
        self.run: str | None = None
        self.superseded = 0  # requests replaced by a newer one before they were answered (the plant moved on)
        self.resyncs = 0  # times the shown state differed from the shield's in a run (the plant's fallback ran)

    @property
    def topic(self) -> str:
        return device_topic(self.device, "hil/obs")

    # -- from the plant ---------------------------------------------------------------------------
    def on_obs(self, payload: bytes) -> None:
        document = validate(decode_json(payload), HIL_OBS)
        reading = np.asarray(document["per_phase"], dtype=np.float32)
        if reading.shape[0] != self.n_phases:
            raise ProtocolError(f"hil/obs: {reading.shape[0]} phases of readings, this intersection has "
                                f"{self.n_phases}")
        shown, clearing = shown_state(document["shown"])
        t, until = document["t"], document["until"]
        if max(shown.phase, shown.target) >= self.n_phases:
            raise ProtocolError("hil/obs: a shown phase outside this intersection's phase table")
        if not shown.since <= t < until <= shown.since + MAX_SPAN:
            raise ProtocolError(f"hil/obs: times must satisfy shown.since <= t < until <= shown.since + {MAX_SPAN:g}")
        if self.pending is not None:
            self.superseded += 1
        self.pending = PlantRequest(document["run"], document["seq"], document["t"], document["until"], reading,
                                    shown, clearing)

    def take(self) -> PlantRequest | None:
        """The newest unanswered request (older ones are stale); signal time becomes its time, and the actuator's
        buffer is emptied for its answer."""
        self.request, self.pending = self.pending, None
        self.states.clear()
        if self.request is not None:
            self.clock.t = self.request.t
        return self.request

    def align(self, shield: SafetyShield, request: PlantRequest) -> bool:
        """Make the shield start from what the heads show; True when that differed inside a run (a resync)."""
        same_run = request.run == self.run
        self.run = request.run
        if shield.state == request.shown and shield.clearing == request.clearing:
            return False
        shield.sync(request.shown, request.clearing)
        if same_run:
            self.resyncs += 1
        return same_run

    @staticmethod
    def plan_until(request: PlantRequest) -> float:
        """The last instant the answer covers: just before the plant's next request."""
        return math.nextafter(request.until, -math.inf)

    # -- sensor ------------------------------------------------------------------------------------
    def read(self) -> np.ndarray:
        if self.request is None:
            raise RuntimeError("no reading from the plant yet")
        return self.request.reading

    # -- actuator ----------------------------------------------------------------------------------
    def show(self, t: float, state: SignalState, link_states: str) -> None:
        """Buffered with the state's own simulation time; sent with the answer."""
        self.states.append({"stage": int(state.stage), "phase": state.phase, "target": state.target,
                            "since": state.since, "links": link_states})

    def answer(self, action: int, source: int, override: bool, resync: bool) -> None:
        request = self.request
        if request is None:
            return
        self.link.publish(device_topic(self.device, "hil/act"), encode({
            "run": request.run, "seq": request.seq, "t": request.t, "action": action, "source": source,
            "override": override, "resync": resync, "states": self.states}), qos=HIL_QOS)

    def close(self) -> None:
        """Nothing to release: the link is the daemon's."""
