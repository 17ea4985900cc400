"""The plant's MQTT side of a HIL run: which device drives which light, one request per device per decision,
and the answers gathered until a deadline, each checked before a state of it reaches SUMO.

The plant connects on the fleet tools' listener with the server's credentials (the broker's ACL lets only
the server write ``hil/obs`` and read every device's ``hil/act``). Requests and answers use QoS 0: an answer
after the deadline is useless, since the plant has run the fallback for that step already.
"""

from __future__ import annotations

import math
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.device.device_config import DeviceConfig, device_files
from edge_runtime.device.hil import HIL_QOS
from edge_runtime.errors import RELEDError
from edge_runtime.fleet.server import server_address
from edge_runtime.keys import KeyFolder
from edge_runtime.mqtt import Link
from edge_runtime.protocol import ROOT, ProtocolError, decode_json, device_of, device_topic, encode
from edge_runtime.schema import HIL_ACT, validate
from edge_runtime.shield import SignalState, SignalTiming, Stage
from trainer.hil.plant import TimedState
from trainer.sim.intersections import Intersection


def check_fleet_folder(fleet: Path) -> None:
    """A `reled-edge fleet up` folder (checked before SUMO starts)."""
    if not (fleet / "keys").is_dir() or not (fleet / "devices").is_dir():
        raise RELEDError(f"{fleet} is not a fleet folder (no keys/ or devices/): start one with "
                         "`reled-edge fleet up --hil --model POLICY.onnx --dir DIR`")


def fleet_devices(fleet: Path, intersections: list[Intersection], timing: SignalTiming) -> dict[str, str]:
    """light id → device id for every HIL device of ``fleet`` (a `reled-edge fleet up` folder) whose light is in
    the scenario; refuses a fleet that drives none of them, or whose devices time their signals differently."""
    check_fleet_folder(fleet)
    configs = [c for c in device_files(fleet / "devices").values() if c.hil]
    lights = {i.tls_id: i for i in intersections}
    by_light: dict[str, str] = {}
    for config in configs:
        light = config.device.intersection
        if light not in lights:
            continue
        if light in by_light:
            raise RELEDError(f"lights are driven by one device each, but {by_light[light]} and {config.id} both "
                             f"drive {light}")
        check_device(config, lights[light], timing)
        by_light[light] = config.id
    if not by_light:
        raise RELEDError(f"no hardware-in-the-loop device of {fleet} drives a light of this scenario: start the "
                         "fleet with `reled-edge fleet up --hil` and the policy exported for this scenario")
    return by_light


def check_device(config: DeviceConfig, inter: Intersection, timing: SignalTiming) -> None:
    """The device must know the light's phases and time its changes as the scenario does (else the plant's audit
    would flag what is only a different configuration)."""
    if tuple(config.signal.green_phases) != inter.green_states:
        raise RELEDError(f"{config.path}: green_phases differ from light {inter.tls_id}'s in the scenario: "
                         "write the device file from the policy exported for this scenario")
    if config.signal.timing != timing:
        raise RELEDError(f"{config.path}: signal timing {config.signal.timing} differs from the scenario's {timing}: "
                         "set the device file's [signal] timings to the scenario's")


def parse_answer(document: dict[str, Any], t: float, until: float, inter: Intersection) -> list[TimedState]:
    """The states of a validated answer, or ProtocolError when they cannot be applied as they are: outside
    [t, until), out of order, for phases the light lacks, or heads that do not show the state they claim (the link
    strings must be the light's own for that state: what the plant then shows and the fallback starts from agree)."""
    if document["action"] >= inter.n_phases:
        raise ProtocolError(f"action {document['action']} outside the light's {inter.n_phases} phases")
    previous = t
    states = []
    for entry in document["states"]:
        since = entry["since"]
        if not previous <= since < until:
            raise ProtocolError(f"a state at t={since:g} is outside [{t:g}, {until:g}) or out of order")
        if max(entry["phase"], entry["target"]) >= inter.n_phases:
            raise ProtocolError("a state for phases the light lacks")
        previous = since
        state = SignalState(Stage(entry["stage"]), entry["phase"], entry["target"], since)
        if entry["links"] != inter.state_string(state):
            raise ProtocolError(f"links {entry['links'][:40]!r} are not what the light shows in the state they come "
                                "with")
        states.append(TimedState(state, False, entry["links"]))
    return states


@dataclass
class Answer:
    document: dict[str, Any]
    rtt: float  # seconds from the request's publication to the answer's arrival


class PlantLink:
    """Requests out, answers in, for one run (``run`` tags both, so answers from an earlier run are ignored)."""

    def __init__(self, fleet: Path, run: str):
        keys = KeyFolder(fleet / "keys")
        self.run = run
        self.link = Link(server_address(keys, fleet / "broker", None, None), f"reled-hil-{run}",
                         [f"{ROOT}/dev/+/hil/act"]).start()
        self.sent: dict[str, float] = {}
        self.late: dict[str, int] = {}  # answers that came after their deadline, per device

    def close(self) -> None:
        self.link.close()

    def request(self, device: str, seq: int, t: float, until: float, reading: np.ndarray, shown: TimedState) -> None:
        s = shown.state
        self.link.publish(device_topic(device, "hil/obs"), encode({
            "run": self.run, "seq": seq, "t": t, "until": until, "per_phase": reading.tolist(),
            "shown": {"stage": int(s.stage), "phase": s.phase, "target": s.target, "since": s.since,
                      "clearing": shown.clearing}}), qos=HIL_QOS)
        self.sent[device] = time.perf_counter()

    def gather(self, seq: int, devices: set[str], deadline: float) -> tuple[dict[str, Answer], dict[str, str]]:
        """Answers to request ``seq`` until each of ``devices`` answered or ``deadline`` (perf_counter) passed;
        also the devices whose answer to it was refused, with why. A device's first word on ``seq`` counts; answers
        to earlier requests are counted late (the plant ran their fallback already)."""
        answers: dict[str, Answer] = {}
        refused: dict[str, str] = {}
        while len(answers) + len(refused) < len(devices):
            remaining = deadline - time.perf_counter()
            try:
                message = self.link.inbox.get(timeout=remaining) if remaining > 0 else self.link.inbox.get_nowait()
            except queue.Empty:
                break
            arrived = time.perf_counter()
            try:
                device = device_of(message.topic)
            except ProtocolError:
                continue
            if device not in devices or device in answers or device in refused:
                continue
            try:
                document = decode_json(message.payload)
            except ProtocolError as exc:  # garbage: it cannot say which request it answers, so it answers this one
                refused[device] = str(exc)
                continue
            if document.get("run") != self.run:
                continue
            if document.get("seq") != seq:
                if isinstance(document.get("seq"), int) and document["seq"] < seq:
                    self.late[device] = self.late.get(device, 0) + 1
                continue
            try:
                answers[device] = Answer(validate(document, HIL_ACT), arrived - self.sent.get(device, math.inf))
            except ProtocolError as exc:
                refused[device] = str(exc)
        return answers, refused
