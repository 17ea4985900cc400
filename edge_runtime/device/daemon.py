"""The intersection controller's signal loop: sense → decide → shield → actuate → outbox, and status reports.

One thread owns all state (paho's network thread only queues messages), so nothing needs a lock. The
signal never waits for the network: with no policy, a failing one or a slow one, the fixed-time plan
drives the shield. Driving the signal comes before recording it: a hostile message, a full disk or a
failing step of the deployment is a counted :class:`Faults` entry (reported, and an event the first
time), never the end of the loop. At start the heads are cleared (yellow, all-red) before the first
green, since what they showed before is unknown. Deployments (commands, download, verification, swap,
probation, rollback) are the :class:`~edge_runtime.device.deployment.Deployment`'s; this loop hands it
messages and decisions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from edge_runtime.credentials import read_password
from edge_runtime.device.adapters import make_actuator, make_sensor
from edge_runtime.device.deployment import Deployment
from edge_runtime.device.device_config import DeviceConfig
from edge_runtime.device.hil import HilBridge, PlantClock
from edge_runtime.device.notify import Notifier
from edge_runtime.device.outbox import Outbox
from edge_runtime.features import PER_PHASE_FEATURES, action_mask, build_observation
from edge_runtime.mqtt import BrokerAddress, Link, Message
from edge_runtime.protocol import ProtocolError, decode_json, device_topic, encode
from edge_runtime.rollouts import SOURCE_FALLBACK, SOURCE_POLICY
from edge_runtime.schema import ACK, validate
from edge_runtime.shield import (
    SafetyShield,
    SignalState,
    Stage,
    clearance_state,
    fixed_time_choice,
    transition_state,
)

log = logging.getLogger(__name__)

REPORT_EVERY = 1.0  # seconds between progress reports while the state does not change
REOPEN_EVERY = 5.0  # seconds between attempts to open an outbox that could not be opened (a full disk)
QUEUE_COLUMN = PER_PHASE_FEATURES.index("queue")  # of a sensor reading: the reward is minus the queued vehicles
T = TypeVar("T")


def describe(exc: BaseException) -> str:
    """An exception in one line (what a fault's event and log say)."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Faults:
    """Problems the controller rides out: counted by kind (the report's ``faults``), logged and sent as an event
    when a kind starts failing and when it works again (after ``quiet`` seconds without a fault, so a step that
    fails every other time does not flood the log), not on every repetition."""

    def __init__(self, publish: Callable[[str, str], None], quiet: float = 10.0):
        self.counts: Counter[str] = Counter()
        self.last: dict[str, float] = {}  # kind -> when it last failed, while it counts as failing
        self.publish = publish
        self.quiet = quiet

    def fault(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        failing = kind in self.last
        self.last[kind] = time.monotonic()
        if not failing:
            log.warning("fault %s: %s (the signal goes on)", kind, detail)
            with contextlib.suppress(Exception):
                self.publish("fault", f"{kind}: {detail}")

    def recovered(self, kind: str) -> None:
        if kind in self.last and time.monotonic() - self.last[kind] >= self.quiet:
            del self.last[kind]
            log.info("fault %s cleared after %d occurrences", kind, self.counts[kind])
            with contextlib.suppress(Exception):
                self.publish("recovered", f"{kind} works again after {self.counts[kind]} faults")


class Clock:
    """Signal time in seconds: wall time × ``speed`` (1 on the street; larger to replay faster)."""

    def __init__(self, speed: float):
        self.speed = speed
        self.start = time.monotonic()

    def restart(self) -> None:
        """Signal time 0 is now (the daemon's start; set up before it is not signal time)."""
        self.start = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self.start) * self.speed

    def wall_until(self, t: float) -> float:
        return max(0.0, (t - self.now()) / self.speed)


class DeviceDaemon:
    """One intersection controller: the signal loop, its rollout outbox and its :class:`Deployment`."""

    def __init__(self, config: DeviceConfig):
        self.config = config
        self.id = config.id
        root = config.device.state_dir
        self.greens = tuple(config.signal.green_phases)
        self.mask = action_mask(len(self.greens))
        self.shield = SafetyShield(len(self.greens), config.signal.timing, clear_first=True)
        self.outbox_path = root / "outbox.sqlite"
        self.outbox: Outbox | None = None
        self.outbox_tried = -REOPEN_EVERY
        self.decisions = 0  # decisions made by this process (recorded or not)
        self.reconnected = threading.Event()
        self.stop_event = threading.Event()
        self.last_report = 0.0
        self.last_source = SOURCE_FALLBACK
        self.policy_failures = 0
        address = BrokerAddress(config.broker.host, config.broker.port, config.username,
                                read_password(config.broker.password_file),
                                str(config.broker.ca_file) if config.broker.ca_file else None)
        topics = ["desired", "rollouts/ack", *(["hil/obs"] if config.hil else [])]
        self.link = Link(address, f"reled-{self.id}", [device_topic(self.id, leaf) for leaf in topics],
                         will=(device_topic(self.id, "status"), encode({"online": False, "device": self.id})),
                         on_connect=self.reconnected.set)
        self.deployment = Deployment(config, self.link, on_change=lambda: self.report(force=True))
        self.faults = Faults(self.deployment.event)
        # the street's detectors and heads, or a simulation's over MQTT (hardware-in-the-loop)
        self.hil = HilBridge(self.link, self.id, len(self.greens)) if config.hil else None
        self.sensor = self.hil or make_sensor(config.sensor.adapter, config.sensor.file, self.greens)
        self.actuator = self.hil or make_actuator(config.actuator.adapter, config.actuator.file)
        self.clock: Clock | PlantClock = self.hil.clock if self.hil else Clock(config.runtime.speed)
        self.systemd = Notifier()

    def guarded(self, kind: str, step: Callable[..., T], *args: Any) -> T | None:
        """Run one step that must not stop the signal; a failure is a counted fault."""
        try:
            result = step(*args)
        except Exception as exc:
            self.faults.fault(kind, describe(exc))
            return None
        self.faults.recovered(kind)
        return result

    def open_outbox(self) -> Outbox | None:
        """The rollout outbox, opened now if it is not yet (it cannot be on a full disk: retried every few s)."""
        if self.outbox is None and time.monotonic() - self.outbox_tried >= REOPEN_EVERY:
            self.outbox_tried = time.monotonic()
            r = self.config.rollouts
            self.outbox = self.guarded("outbox_open", Outbox, self.outbox_path, self.id, r.batch_rows, r.flush_seconds,
                                       r.resend_seconds, r.max_rows)
        return self.outbox

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        """Clear the heads, recover, connect in the background and drive the signal until :meth:`stop`."""
        self.clock.restart()
        self.show(self.shield.state)
        self.guarded("state", self.deployment.recover)
        self.open_outbox()
        self.link.connect()
        self.systemd.ready(self.status_line())
        next_decision = self.clock.now()
        try:
            while not self.stop_event.is_set():
                self.drain(self.clock.wall_until(next_decision))
                if self.reconnected.is_set():
                    self.guarded("report", self.on_reconnect)
                if self.hil is not None:
                    self.hil_step(self.hil)
                else:
                    now = self.clock.now()
                    for state in self.shield.advance(now):
                        self.show(state)
                    if now >= next_decision:
                        next_decision += self.config.runtime.decision_seconds
                        if not self.limit_reached():
                            self.decide(now)
                self.guarded("deployment", self.deployment.download_step)
                self.rollouts_step()
                if time.monotonic() - self.last_report >= REPORT_EVERY:
                    self.guarded("report", self.report)
                self.systemd.status(self.status_line())
                self.systemd.watchdog()  # from the loop only: a loop that hangs stops the pings
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def status_line(self) -> str:
        """What `systemctl status` shows: who drives the signal, the active model and the deploy state."""
        active = self.deployment.state.active
        model = f"policy v{active.policy_version} ({active.sha256[:12]})" if active else "no model"
        mode = "policy" if self.last_source == SOURCE_POLICY else "fixed-time plan"
        return f"{mode} driving {self.config.device.intersection}; {model}; deploy {self.deployment.state.state}"

    def shutdown(self) -> None:
        self.systemd.stopping()
        with contextlib.suppress(Exception):
            self.link.publish(device_topic(self.id, "status"), encode({"online": False, "device": self.id}),
                              retain=True).wait_for_publish(1.0)
        self.link.close()
        if self.outbox is not None:
            with contextlib.suppress(sqlite3.Error):
                self.outbox.close()
        with contextlib.suppress(OSError):
            self.actuator.close()
        self.systemd.close()

    def limit_reached(self) -> bool:
        limit = self.config.runtime.max_decisions
        return bool(limit) and self.outbox is not None and self.outbox.recorded() >= limit

    def drain(self, wait: float) -> None:
        """Handle every queued message; block up to ``wait`` seconds for the first one."""
        try:
            message = self.link.inbox.get(timeout=min(wait, 0.05)) if wait > 0 else self.link.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                self.handle(message)
            except ProtocolError as exc:
                self.faults.fault("bad_message", f"{message.topic}: {exc}")
            except Exception as exc:  # a message must never stop the signal, whatever it does to the code
                log.exception("handling a message on %s", message.topic)
                self.faults.fault("message_error", f"{message.topic}: {describe(exc)}")
            try:
                message = self.link.inbox.get_nowait()
            except queue.Empty:
                return

    def handle(self, message: Message) -> None:
        topic = message.topic
        if topic == device_topic(self.id, "desired"):
            self.deployment.on_desired(message.payload)
        elif topic == device_topic(self.id, "rollouts/ack"):
            ack = validate(decode_json(message.payload), ACK)
            if self.outbox is not None:
                self.outbox.ack(ack["epoch"], ack["seq"])
        elif topic.startswith("reled/v1/models/"):
            self.deployment.on_chunk(topic, message.payload)
        elif self.hil is not None and topic == self.hil.topic:
            self.hil.on_obs(message.payload)

    def on_reconnect(self) -> None:
        self.reconnected.clear()
        self.link.publish(device_topic(self.id, "status"),
                          encode({"online": True, "device": self.id, "pid": os.getpid(), "ts": time.time()}),
                          retain=True)
        self.deployment.on_reconnect()
        if self.outbox is not None:
            self.guarded("outbox_send", self.outbox.resend_all)
        self.report(force=True)

    def report(self, force: bool = False) -> None:
        """The retained ``reported`` document: deploy state, signal mode and outbox figures."""
        if not force and not self.link.connected.is_set():
            return
        self.last_report = time.monotonic()
        body = {"device": self.id, "intersection": self.config.device.intersection, **self.deployment.report(),
                "mode": "policy" if self.last_source == SOURCE_POLICY else "fallback", "decided": self.decisions,
                "faults": dict(self.faults.counts), "ts": time.time()}
        if self.hil is not None:
            body["hil"] = {"resyncs": self.hil.resyncs, "superseded": self.hil.superseded}
        if self.outbox is not None:  # not while it cannot be opened (a full disk)
            body.update(decisions=self.outbox.recorded(), outbox_rows=self.outbox.pending_rows(),
                        outbox_epoch=self.outbox.epoch)
        self.link.publish(device_topic(self.id, "reported"), encode(body), retain=True)

    # -- the decision loop -----------------------------------------------------------------------
    def show(self, state: SignalState) -> None:
        links = clearance_state(self.greens, state.stage) if self.shield.clearing else \
            transition_state(self.greens, state.stage, state.phase, state.target)
        self.guarded("actuator", self.actuator.show, self.clock.now(), state, links)

    def fixed_time_choice(self, now: float) -> int:
        return fixed_time_choice(self.shield, now, self.config.signal.fallback_green)

    def hil_step(self, hil: HilBridge) -> None:
        """Answer the plant's newest request: start from what its heads show, decide at its time, and send every
        state the shield enters until its next request."""
        request = hil.take()
        if request is None or self.limit_reached():  # past max_decisions: no answer, the plant's plan runs
            return
        resync = bool(self.guarded("hil", hil.align, self.shield, request))
        for state in self.shield.advance(request.t):
            self.show(state)
        action, source, override = self.decide(request.t)
        for state in self.shield.advance(hil.plan_until(request)):
            self.show(state)
        self.guarded("hil", hil.answer, action, source, override, resync)

    def decide(self, now: float) -> tuple[int, int, bool]:
        """One decision: the policy's phase (or the fixed-time plan's) through the shield, recorded in the outbox.
        Returns the phase proposed, its source and whether the shield overrode it."""
        deployment = self.deployment
        self.decisions += 1
        if self.shield.state.stage is Stage.GREEN:
            self.guarded("deployment", deployment.swap_if_staged)  # never mid-yellow or all-red
        reading = self.guarded("sensor", self.sensor.read)
        shield = self.shield
        if reading is None:  # no detectors: the fixed-time plan, nothing to record
            action = self.fixed_time_choice(now)
            for state in shield.propose(action, now):
                self.show(state)
            self.last_source = SOURCE_FALLBACK
            return action, SOURCE_FALLBACK, shield.state.green_phase != action
        obs = build_observation(reading, shield.state.green_phase, shield.green_elapsed(now),
                                shield.min_green_met(now))
        action, log_prob, source = self.fixed_time_choice(now), 0.0, SOURCE_FALLBACK
        policy = deployment.policy
        if policy is not None:
            healthy, problem = False, ""
            try:
                decision = policy.decide(obs, self.mask)
                healthy = decision.seconds * 1000 <= self.config.inference.latency_budget_ms
                problem = "" if healthy else f"decision took {decision.seconds * 1000:.2f} ms"
            except Exception as exc:  # a broken model must never stop the signal
                problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if healthy:
                action, log_prob, source = decision.action, decision.log_prob, SOURCE_POLICY
                self.policy_failures = 0
            else:
                self.policy_failures += 1
                if self.policy_failures == 1:
                    deployment.event("fallback", f"policy unhealthy ({problem}): fixed-time plan for this decision")
            self.guarded("deployment", deployment.probation_step, healthy, problem)
        for state in shield.propose(action, now):
            self.show(state)
        self.last_source = source
        override = shield.state.green_phase != action
        active = deployment.state.active
        version = active.policy_version if active and source == SOURCE_POLICY else 0
        outbox = self.open_outbox()
        if outbox is None:
            self.faults.fault("outbox_write", "no outbox (it could not be opened): decision not recorded")
        else:
            self.guarded("outbox_write", outbox.add, now, obs, self.mask, action, log_prob, override,
                         -float(reading[:, QUEUE_COLUMN].sum()), source, version)
        return action, source, override

    def rollouts_step(self) -> None:
        if self.outbox is not None:
            self.guarded("outbox_send", self.send_rollouts, self.outbox)

    def send_rollouts(self, outbox: Outbox) -> None:
        outbox.seal()
        outbox.enforce_cap()
        if not self.link.connected.is_set():
            return
        for seq, payload in outbox.due():
            self.link.publish(device_topic(self.id, "rollouts"), payload)
            log.debug("sent rollout batch %d", seq)
