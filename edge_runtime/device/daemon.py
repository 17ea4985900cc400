"""The intersection controller's signal loop: sense → decide → shield → actuate → outbox, and status reports.

One thread owns all state (paho's network thread only queues messages), so nothing needs a lock. The
signal never waits for the network: with no policy, a failing one or a slow one, the fixed-time plan
drives the shield. Deployments (commands, download, verification, swap, probation, rollback) are the
:class:`~edge_runtime.device.deployment.Deployment`'s; this loop hands it messages and decisions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time

from edge_runtime.device.adapters import make_actuator, make_sensor
from edge_runtime.device.deployment import Deployment
from edge_runtime.device.device_config import DeviceConfig
from edge_runtime.device.outbox import Outbox
from edge_runtime.features import PER_PHASE_FEATURES, action_mask, build_observation
from edge_runtime.keys import read_password
from edge_runtime.mqtt import BrokerAddress, Link, Message
from edge_runtime.protocol import ProtocolError, decode_json, device_topic, encode
from edge_runtime.rollouts import SOURCE_FALLBACK, SOURCE_POLICY
from edge_runtime.shield import SafetyShield, SignalState, Stage, transition_state

log = logging.getLogger(__name__)

REPORT_EVERY = 1.0  # seconds between progress reports while the state does not change
QUEUE_COLUMN = PER_PHASE_FEATURES.index("queue")  # of a sensor reading: the reward is minus the queued vehicles


def sd_notify(message: str) -> None:
    """systemd notification (READY=1, WATCHDOG=1) when run under a unit with NotifyAccess."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


class Clock:
    """Signal time in seconds: wall time × ``speed`` (1 on the street; larger to replay faster)."""

    def __init__(self, speed: float):
        self.speed = speed
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
        self.shield = SafetyShield(len(self.greens), config.signal.timing)
        self.sensor = make_sensor(config.sensor.adapter, config.sensor.file, len(self.greens))
        self.actuator = make_actuator(config.actuator.adapter, config.actuator.file)
        r = config.rollouts
        self.outbox = Outbox(root / "outbox.sqlite", self.id, r.batch_rows, r.flush_seconds, r.resend_seconds,
                             r.max_rows)
        self.clock = Clock(config.runtime.speed)
        self.reconnected = threading.Event()
        self.stop_event = threading.Event()
        self.last_report = 0.0
        self.last_source = SOURCE_FALLBACK
        self.policy_failures = 0
        address = BrokerAddress(config.broker.host, config.broker.port, config.username,
                                read_password(config.broker.password_file),
                                str(config.broker.ca_file) if config.broker.ca_file else None)
        self.link = Link(address, f"reled-{self.id}",
                         [device_topic(self.id, "desired"), device_topic(self.id, "rollouts/ack")],
                         will=(device_topic(self.id, "status"), encode({"online": False, "device": self.id})),
                         on_connect=self.reconnected.set)
        self.deployment = Deployment(config, self.link, on_change=lambda: self.report(force=True))

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        """Recover, connect in the background and drive the signal until :meth:`stop`."""
        self.deployment.recover()
        self.link.connect()
        sd_notify("READY=1")
        next_decision = self.clock.now()
        last_watchdog = 0.0
        try:
            while not self.stop_event.is_set():
                self.drain(self.clock.wall_until(next_decision))
                if self.reconnected.is_set():
                    self.on_reconnect()
                now = self.clock.now()
                for state in self.shield.advance(now):
                    self.show(state)
                if now >= next_decision:
                    next_decision += self.config.runtime.decision_seconds
                    if not self.limit_reached():
                        self.decide(now)
                self.deployment.download_step()
                self.rollouts_step()
                if time.monotonic() - self.last_report >= REPORT_EVERY:
                    self.report()
                if time.monotonic() - last_watchdog >= 1.0:
                    sd_notify("WATCHDOG=1")
                    last_watchdog = time.monotonic()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.link.publish(device_topic(self.id, "status"), encode({"online": False, "device": self.id}),
                              retain=True).wait_for_publish(1.0)
        self.link.close()
        self.outbox.close()
        self.actuator.close()

    def limit_reached(self) -> bool:
        limit = self.config.runtime.max_decisions
        return bool(limit) and self.outbox.recorded() >= limit

    def drain(self, wait: float) -> None:
        """Handle every queued message; block up to ``wait`` seconds for the first one."""
        try:
            message = self.link.inbox.get(timeout=min(wait, 0.05)) if wait > 0 else self.link.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self.handle(message)
            try:
                message = self.link.inbox.get_nowait()
            except queue.Empty:
                return

    def handle(self, message: Message) -> None:
        topic = message.topic
        if topic == device_topic(self.id, "desired"):
            self.deployment.on_desired(message.payload)
        elif topic == device_topic(self.id, "rollouts/ack"):
            with contextlib.suppress(ProtocolError, KeyError, TypeError, ValueError):
                ack = decode_json(message.payload)
                self.outbox.ack(int(ack["epoch"]), int(ack["seq"]))
        elif topic.startswith("reled/v1/models/"):
            self.deployment.on_chunk(topic, message.payload)

    def on_reconnect(self) -> None:
        self.reconnected.clear()
        self.link.publish(device_topic(self.id, "status"),
                          encode({"online": True, "device": self.id, "pid": os.getpid(), "ts": time.time()}),
                          retain=True)
        self.deployment.on_reconnect()
        self.outbox.resend_all()
        self.report(force=True)

    def report(self, force: bool = False) -> None:
        """The retained ``reported`` document: deploy state, signal mode and outbox figures."""
        if not force and not self.link.connected.is_set():
            return
        self.last_report = time.monotonic()
        body = {"device": self.id, "intersection": self.config.device.intersection, **self.deployment.report(),
                "mode": "policy" if self.last_source == SOURCE_POLICY else "fallback",
                "decisions": self.outbox.recorded(), "outbox_rows": self.outbox.pending_rows(), "ts": time.time()}
        self.link.publish(device_topic(self.id, "reported"), encode(body), retain=True)

    # -- the decision loop -----------------------------------------------------------------------
    def show(self, state: SignalState) -> None:
        self.actuator.show(self.clock.now(), state, transition_state(self.greens, state.stage, state.phase,
                                                                     state.target))

    def fixed_time_choice(self, now: float) -> int:
        s = self.shield.state
        if s.stage is Stage.GREEN and self.shield.green_elapsed(now) >= self.config.signal.fallback_green:
            return (s.phase + 1) % len(self.greens)
        return s.green_phase

    def decide(self, now: float) -> None:
        deployment = self.deployment
        if self.shield.state.stage is Stage.GREEN:
            deployment.swap_if_staged()  # never mid-yellow or all-red
        reading = self.sensor.read()
        shield = self.shield
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
            deployment.probation_step(healthy, problem)
        for state in shield.propose(action, now):
            self.show(state)
        self.last_source = source
        active = deployment.state.active
        version = active.policy_version if active and source == SOURCE_POLICY else 0
        self.outbox.add(now, obs, self.mask, action, log_prob, shield.state.green_phase != action,
                        -float(reading[:, QUEUE_COLUMN].sum()), source, version)

    def rollouts_step(self) -> None:
        self.outbox.seal()
        self.outbox.enforce_cap()
        if not self.link.connected.is_set():
            return
        for seq, payload in self.outbox.due():
            self.link.publish(device_topic(self.id, "rollouts"), payload)
            log.debug("sent rollout batch %d", seq)
