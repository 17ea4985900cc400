"""The intersection controller: decision loop, signed deployments over MQTT, rollout streaming.

One thread owns all state (paho's network thread only queues messages), so every step of the deploy
state machine is persisted before it is taken and nothing needs a lock. The signal never waits for
the network: with no policy, a failing one or a slow one, the fixed-time plan drives the shield.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.adapters import make_actuator, make_sensor
from edge_runtime.deploy_state import DeployState, Job, ModelRef, StateFile
from edge_runtime.device_config import DeviceConfig
from edge_runtime.errors import RELEDError
from edge_runtime.features import SCHEMA_VERSION, action_mask, build_observation
from edge_runtime.fileio import sha256_file
from edge_runtime.keys import load_public_key, read_password
from edge_runtime.mqtt import BrokerAddress, Link, Message
from edge_runtime.outbox import Outbox
from edge_runtime.policy import OnnxPolicy
from edge_runtime.protocol import Manifest, ProtocolError, chunk_topic, decode_json, device_topic, encode, verify
from edge_runtime.rollouts import SOURCE_FALLBACK, SOURCE_POLICY
from edge_runtime.shield import SafetyShield, SignalState, Stage, transition_state

log = logging.getLogger(__name__)

REPORT_EVERY = 1.0  # seconds between progress reports while the state does not change
SELFTEST_RUNS = 50  # timed decisions in the staging latency check


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


class Controller:
    def __init__(self, config: DeviceConfig):
        self.config = config
        self.id = config.id
        root = config.device.state_dir
        self.models_dir = root / "models"
        self.downloads_dir = root / "downloads"
        for folder in (self.models_dir, self.downloads_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.state_file = StateFile(root / "state.json")
        self.state = self.state_file.load()
        self.public_key = load_public_key(config.security.public_key)
        self.greens = tuple(config.signal.green_phases)
        self.mask = action_mask(len(self.greens))
        self.shield = SafetyShield(len(self.greens), config.signal.timing)
        self.sensor = make_sensor(config.sensor.adapter, config.sensor.file, len(self.greens))
        self.actuator = make_actuator(config.actuator.adapter, config.actuator.file)
        r = config.rollouts
        self.outbox = Outbox(root / "outbox.sqlite", self.id, r.batch_rows, r.flush_seconds, r.resend_seconds,
                             r.max_rows)
        self.clock = Clock(config.runtime.speed)
        self.policy: OnnxPolicy | None = None
        self.candidate: OnnxPolicy | None = None
        self.requested: dict[int, float] = {}
        self.next_request_at = 0.0
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

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        """Recover, connect in the background and drive the signal until :meth:`stop`."""
        self.recover()
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
                self.download_step()
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

    def on_reconnect(self) -> None:
        self.reconnected.clear()
        self.link.publish(device_topic(self.id, "status"),
                          encode({"online": True, "device": self.id, "pid": os.getpid(), "ts": time.time()}),
                          retain=True)
        self.requested.clear()  # chunks asked for before the drop may never come: ask again
        self.outbox.resend_all()
        self.report(force=True)

    # -- persistence and reporting ---------------------------------------------------------------
    def save(self) -> None:
        self.state_file.save(self.state)

    def enter(self, state: DeployState) -> None:
        """Persist the new state, then tell the server."""
        self.state.state = state
        self.save()
        self.report(force=True)

    def report(self, force: bool = False) -> None:
        if not force and not self.link.connected.is_set():
            return
        self.last_report = time.monotonic()
        s = self.state
        job = None
        if s.job is not None:
            job = {"sha256": s.job.manifest["sha256"], "policy_version": s.job.manifest["policy_version"],
                   "seq": s.job.seq, "chunks_have": sum(s.job.have), "chunks_total": len(s.job.have)}
        body = {"device": self.id, "intersection": self.config.device.intersection, "state": str(s.state),
                "active": asdict(s.active) if s.active else None, "previous": [asdict(p) for p in s.previous],
                "high_water": s.high_water, "desired_seq": s.desired_seq, "error": s.error,
                "error_seq": s.error_seq, "job": job,
                "mode": "policy" if self.last_source == SOURCE_POLICY else "fallback",
                "decisions": self.outbox.recorded(), "outbox_rows": self.outbox.pending_rows(), "ts": time.time()}
        self.link.publish(device_topic(self.id, "reported"), encode(body), retain=True)

    def event(self, kind: str, detail: str) -> None:
        log.log(logging.WARNING if kind in ("refused", "failed", "rolled_back") else logging.INFO, "%s: %s", kind,
                detail)
        self.link.publish(device_topic(self.id, "events"),
                          encode({"device": self.id, "kind": kind, "detail": detail, "state": str(self.state.state),
                                  "ts": time.time()}))

    # -- models ----------------------------------------------------------------------------------
    def model_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.onnx"

    def load_policy(self, ref: ModelRef) -> OnnxPolicy:
        inference = self.config.inference
        return OnnxPolicy(self.model_path(ref.sha256), inference.threads, inference.providers)

    def recover(self) -> None:
        """Pick up where the last run stopped (DESIGN §6: the state was saved before each step)."""
        s = self.state
        while s.active is not None and self.policy is None:
            try:
                self.policy = self.load_policy(s.active)
            except RELEDError as exc:
                self.event("failed", f"active model {s.active.sha256[:12]} does not load ({exc}); trying the previous")
                s.active = s.previous.pop(0) if s.previous else None
        if s.state is DeployState.PROBATION:
            self.rollback("restarted during probation")
        elif s.state in (DeployState.VERIFIED, DeployState.STAGED):
            self.verify_and_stage()
        elif s.state is DeployState.DOWNLOADING and s.job is not None:
            if not self.part_path(s.job.manifest["sha256"]).exists():
                s.job.have = [False] * len(s.job.have)
            self.link.subscribe(chunk_topic(s.job.manifest["sha256"], "+"))  # taken up when the link connects
        self.save()

    # -- commands from the server ----------------------------------------------------------------
    def handle(self, message: Message) -> None:
        topic = message.topic
        if topic == device_topic(self.id, "desired"):
            self.on_desired(message.payload)
        elif topic == device_topic(self.id, "rollouts/ack"):
            with contextlib.suppress(ProtocolError, KeyError, TypeError, ValueError):
                ack = decode_json(message.payload)
                self.outbox.ack(int(ack["epoch"]), int(ack["seq"]))
        elif topic.startswith("reled/v1/models/"):
            self.on_chunk(topic, message.payload)

    def refuse(self, seq: int, reason: str) -> None:
        self.state.error, self.state.error_seq = reason, seq
        self.save()
        self.event("refused", reason)
        self.report(force=True)

    def on_desired(self, payload: bytes) -> None:
        if not payload:
            return  # the retained command was cleared
        try:
            doc = verify(payload, self.public_key)
            seq = int(doc["seq"])
            device = doc["device"]
        except ProtocolError as exc:
            self.refuse(self.state.desired_seq, f"command refused: {exc}")
            return
        except (KeyError, TypeError, ValueError) as exc:
            self.refuse(self.state.desired_seq, f"command refused: malformed document ({exc})")
            return
        if device != self.id:
            self.refuse(self.state.desired_seq, f"command for device {device!r} refused (this is {self.id!r})")
            return
        if seq == self.state.desired_seq:
            return  # the retained copy of a command already handled
        if seq < self.state.desired_seq:
            self.refuse(self.state.desired_seq, f"replayed command refused (seq {seq} < {self.state.desired_seq})")
            return
        self.state.desired_seq = seq
        kind = doc.get("kind")
        if kind == "deploy":
            self.on_deploy(doc.get("manifest"), seq)
        elif kind == "rollback":
            self.rollback("requested by the server", seq)
        else:
            self.refuse(seq, f"unknown command kind {kind!r}")

    def on_deploy(self, raw_manifest: Any, seq: int) -> None:
        try:
            manifest = Manifest.from_dict(raw_manifest)
        except ProtocolError as exc:
            self.refuse(seq, f"manifest refused: {exc}")
            return
        problem = self.manifest_problem(manifest)
        if problem:
            self.refuse(seq, f"manifest refused: {problem}")
            return
        active = self.state.active
        if active is not None and (manifest.sha256, manifest.policy_version) == (active.sha256,
                                                                                 active.policy_version):
            self.state.error = ""
            self.enter(DeployState.COMMITTED)  # already running it: a repeated deploy is a no-op
            return
        if manifest.policy_version <= self.state.high_water:
            self.refuse(seq, f"manifest refused: policy version {manifest.policy_version} is not newer than "
                             f"{self.state.high_water}, the newest this controller has accepted (anti-rollback)")
            return
        self.abandon_job()
        self.state.job = Job(manifest=manifest.to_dict(), seq=seq, have=[False] * len(manifest.chunks))
        self.state.error = ""
        self.requested.clear()
        self.enter(DeployState.DOWNLOADING)
        self.event("downloading", f"policy v{manifest.policy_version} ({manifest.size} bytes, "
                                  f"{len(manifest.chunks)} chunks)")
        self.link.subscribe(chunk_topic(manifest.sha256, "+"))

    def manifest_problem(self, m: Manifest) -> str | None:
        config = self.config
        if m.expired:
            return f"expired at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(m.expires))} UTC"
        if m.intersection != config.device.intersection:
            return f"it is for intersection {m.intersection!r}; this controller runs {config.device.intersection!r}"
        if tuple(m.phase_table) != self.greens:
            return "its phase table differs from this intersection's green phases"
        if m.schema_version != SCHEMA_VERSION:
            return f"observation schema v{m.schema_version}; this controller builds v{SCHEMA_VERSION}"
        if m.size > config.security.max_model_bytes:
            return f"model of {m.size} bytes exceeds max_model_bytes = {config.security.max_model_bytes}"
        return None

    def abandon_job(self) -> None:
        job = self.state.job
        if job is not None:
            self.link.unsubscribe(chunk_topic(job.manifest["sha256"], "+"))
            self.part_path(job.manifest["sha256"]).unlink(missing_ok=True)
            self.state.job = None
        self.candidate = None

    def fail(self, reason: str) -> None:
        self.event("failed", reason)
        seq = self.state.job.seq if self.state.job else self.state.desired_seq
        self.abandon_job()
        self.state.error, self.state.error_seq = reason, seq
        self.enter(DeployState.FAILED)

    # -- download --------------------------------------------------------------------------------
    def part_path(self, sha256: str) -> Path:
        return self.downloads_dir / f"{sha256}.part"

    def download_step(self) -> None:
        job = self.state.job
        if self.state.state is not DeployState.DOWNLOADING or job is None:
            return
        missing = [i for i, have in enumerate(job.have) if not have]
        if not missing:
            self.verify_and_stage()
            return
        if not self.link.connected.is_set():
            return
        now = time.monotonic()
        timeout = self.config.download.chunk_timeout
        self.requested = {i: t for i, t in self.requested.items() if now - t < timeout and not job.have[i]}
        room = self.config.download.window - len(self.requested)
        if room <= 0 or now < self.next_request_at:
            return
        batch = [i for i in missing if i not in self.requested][:room]
        if self.config.download.kbps > 0:
            batch = batch[:1]
            size, index = job.manifest["chunk_size"], batch[0] if batch else 0
            nbytes = min(size, job.manifest["size"] - index * size)
            self.next_request_at = now + nbytes / (self.config.download.kbps * 1024)
        if not batch:
            return
        self.link.publish(device_topic(self.id, "req/chunk"),
                          encode({"sha256": job.manifest["sha256"], "chunks": batch}))
        for i in batch:
            self.requested[i] = now

    def on_chunk(self, topic: str, payload: bytes) -> None:
        job = self.state.job
        parts = topic.split("/")
        if job is None or self.state.state is not DeployState.DOWNLOADING or len(parts) != 6 \
                or parts[3] != job.manifest["sha256"] or not parts[5].isdigit():
            return
        index = int(parts[5])
        if index >= len(job.have) or job.have[index]:
            return
        manifest = job.parsed
        expected = manifest.chunk_size if index < len(job.have) - 1 else manifest.size - index * manifest.chunk_size
        if len(payload) != expected or hashlib.sha256(payload).hexdigest() != manifest.chunks[index]:
            job.bad_chunks += 1
            self.requested.pop(index, None)
            self.event("refused", f"chunk {index} failed its hash check ({job.bad_chunks} bad so far)")
            if job.bad_chunks >= self.config.download.max_bad_chunks:
                self.fail(f"{job.bad_chunks} chunks failed their hash check: deployment abandoned")
            else:
                self.save()
            return
        part = self.part_path(manifest.sha256)
        with part.open("r+b" if part.exists() else "w+b") as fh:
            fh.seek(index * manifest.chunk_size)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        job.have[index] = True
        self.requested.pop(index, None)
        self.save()

    # -- verify, stage, swap, probation ----------------------------------------------------------
    def verify_and_stage(self) -> None:
        job = self.state.job
        if job is None:
            self.enter(DeployState.IDLE)
            return
        manifest = job.parsed
        part, final = self.part_path(manifest.sha256), self.model_path(manifest.sha256)
        if self.state.state is DeployState.DOWNLOADING:
            if part.stat().st_size != manifest.size or sha256_file(part) != manifest.sha256:
                self.fail("the assembled model does not match the manifest's size and SHA-256")
                return
            os.replace(part, final)
            self.state.high_water = max(self.state.high_water, manifest.policy_version)
            self.link.unsubscribe(chunk_topic(manifest.sha256, "+"))
            self.enter(DeployState.VERIFIED)
            self.event("verified", f"policy v{manifest.policy_version}: size, SHA-256 and signature check out")
        if not final.exists() or sha256_file(final) != manifest.sha256:
            self.fail("the verified model file is missing or changed on disk")
            return
        problem = self.shadow_problem(final, manifest)
        if problem:
            final.unlink(missing_ok=True)
            self.fail(f"shadow test failed: {problem}")
            return
        self.enter(DeployState.STAGED)
        self.event("staged", f"policy v{manifest.policy_version} passed its self-test; swapping at the next "
                             "phase-safe point")

    def shadow_problem(self, path: Path, manifest: Manifest) -> str | None:
        """Load the new model beside the active one and test it without touching the signal."""
        inference = self.config.inference
        try:
            candidate = OnnxPolicy(path, inference.threads, inference.providers)
        except RELEDError as exc:
            return str(exc)
        meta = candidate.meta
        if meta.policy_version != manifest.policy_version:
            return f"the model says policy v{meta.policy_version}, the manifest v{manifest.policy_version}"
        if tuple(meta.phase_tables.get(self.config.device.intersection, ())) != self.greens:
            return "the model was not exported for this intersection's phase table"
        problem = candidate.self_test()
        if problem:
            return problem
        obs = np.asarray(meta.selftest.obs[0], dtype=np.float32)
        mask = np.asarray(meta.selftest.mask[0], dtype=bool)
        seconds = sorted(candidate.decide(obs, mask).seconds for _ in range(SELFTEST_RUNS))
        p99 = seconds[int(0.99 * (len(seconds) - 1))] * 1000
        if p99 > inference.latency_budget_ms:
            return f"decision p99 {p99:.2f} ms exceeds the {inference.latency_budget_ms:g} ms budget"
        self.candidate = candidate
        return None

    def swap_in(self) -> None:
        """At a phase-safe point (a green, at a decision): the staged model takes over, on probation."""
        job = self.state.job
        assert job is not None and self.candidate is not None
        manifest = job.parsed
        if self.state.active is not None:
            self.state.previous.insert(0, self.state.active)
        self.state.active = ModelRef(manifest.sha256, manifest.policy_version)
        job.probation_decisions = job.probation_failures = 0
        self.policy, self.candidate = self.candidate, None
        self.enter(DeployState.PROBATION)
        self.event("swapped", f"policy v{manifest.policy_version} is driving the signal, on probation for "
                              f"{self.config.probation.decisions} decisions")

    def probation_step(self, healthy: bool, problem: str) -> None:
        job = self.state.job
        if self.state.state is not DeployState.PROBATION or job is None:
            return
        job.probation_decisions += 1
        if not healthy:
            job.probation_failures += 1
            if job.probation_failures > self.config.probation.max_failures:
                self.rollback(f"probation failed: {problem}")
                return
        if job.probation_decisions >= self.config.probation.decisions:
            version = job.manifest["policy_version"]
            self.state.job = None
            self.state.error = ""
            self.prune_models()
            self.enter(DeployState.COMMITTED)
            self.event("committed", f"policy v{version} passed probation")

    def rollback(self, reason: str, seq: int | None = None) -> None:
        """Back to the previous model (fixed-time if there is none); the current one is dropped."""
        failed = self.state.active
        job = self.state.job
        self.abandon_job()
        self.policy = None
        self.state.active = None
        while self.state.previous and self.policy is None:
            ref = self.state.previous.pop(0)
            try:
                self.policy, self.state.active = self.load_policy(ref), ref
            except RELEDError as exc:
                self.event("failed", f"previous model {ref.sha256[:12]} does not load: {exc}")
        if failed is not None:
            self.model_path(failed.sha256).unlink(missing_ok=True)
        self.state.error = reason
        self.state.error_seq = seq if seq is not None else (job.seq if job else self.state.desired_seq)
        self.enter(DeployState.ROLLED_BACK)
        now_running = f"policy v{self.state.active.policy_version}" if self.state.active else "the fixed-time plan"
        self.event("rolled_back", f"{reason}; {now_running} is driving the signal")

    def prune_models(self) -> None:
        keep = self.config.probation.keep_models
        for ref in self.state.previous[keep:]:
            self.model_path(ref.sha256).unlink(missing_ok=True)
        del self.state.previous[keep:]

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
        if self.state.state is DeployState.STAGED and self.candidate is not None \
                and self.shield.state.stage is Stage.GREEN:
            self.swap_in()
        reading = self.sensor.read()
        shield = self.shield
        obs = build_observation(reading, shield.state.green_phase, shield.green_elapsed(now),
                                shield.min_green_met(now))
        action, log_prob, source = self.fixed_time_choice(now), 0.0, SOURCE_FALLBACK
        if self.policy is not None:
            healthy, problem = False, ""
            try:
                decision = self.policy.decide(obs, self.mask)
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
                    self.event("fallback", f"policy unhealthy ({problem}): fixed-time plan for this decision")
            self.probation_step(healthy, problem)
        for state in shield.propose(action, now):
            self.show(state)
        self.last_source = source
        version = self.state.active.policy_version if self.state.active and source == SOURCE_POLICY else 0
        self.outbox.add(now, obs, self.mask, action, log_prob, shield.state.green_phase != action,
                        -float(reading[:, 0].sum()), source, version)

    def rollouts_step(self) -> None:
        self.outbox.seal()
        self.outbox.enforce_cap()
        if not self.link.connected.is_set():
            return
        for seq, payload in self.outbox.due():
            self.link.publish(device_topic(self.id, "rollouts"), payload)
            log.debug("sent rollout batch %d", seq)

