"""A controller's deployments: signed commands, chunked download, verification, shadow test, swap, probation,
rollback and recovery after a restart.

Every move of the state machine goes through :meth:`Deployment.enter`, which checks it against
:data:`~edge_runtime.device.deploy_state.TRANSITIONS` and persists it before the step it starts, so a
restart (or SIGKILL) resumes from the file. The deployment never touches the signal: the daemon asks it
for the active policy, hands it each decision's health during probation and tells it when a swap is
phase-safe. It talks to the broker only through a :class:`DeployLink` (publish, subscribe), so it can
run against a fake link in tests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_runtime.credentials import load_public_key
from edge_runtime.device.deploy_state import DeployState, Job, ModelRef, StateFile, check_transition
from edge_runtime.device.device_config import DeviceConfig
from edge_runtime.errors import RELEDError
from edge_runtime.features import SCHEMA_VERSION
from edge_runtime.fileio import sha256_bytes, sha256_file
from edge_runtime.policy import OnnxPolicy
from edge_runtime.protocol import Manifest, ProtocolError, chunk_topic, device_topic, encode, verify
from edge_runtime.schema import COMMAND, validate

log = logging.getLogger(__name__)

SELFTEST_RUNS = 50  # timed decisions in the staging latency check


def command_fields(doc: dict[str, Any]) -> tuple[int, str, float]:
    """(seq, device, issued) of a verified command, every field checked against ``schema.COMMAND``."""
    try:
        command = validate(doc, COMMAND)
    except ProtocolError as exc:
        raise ProtocolError(f"malformed document: {exc}") from exc
    return command["seq"], command["device"], command["issued"]


def same_model(a: Manifest, b: Manifest) -> bool:
    """The same file cut into the same chunks: a download of one continues as a download of the other."""
    return (a.sha256, a.size, a.chunk_size, a.chunks) == (b.sha256, b.size, b.chunk_size, b.chunks)


class DeployLink(Protocol):
    """What a deployment needs from the MQTT connection (:class:`edge_runtime.mqtt.Link` is one)."""

    connected: threading.Event

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any: ...

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...


class Deployment:
    """The deploy state machine of one controller, with its model files and its persisted state."""

    def __init__(self, config: DeviceConfig, link: DeployLink, on_change: Callable[[], None] = lambda: None):
        self.config = config
        self.id = config.id
        self.link = link
        self.on_change = on_change  # the daemon reports to the server whenever the state or the error changes
        root = config.device.state_dir
        self.models_dir = root / "models"
        self.downloads_dir = root / "downloads"
        for folder in (self.models_dir, self.downloads_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.state_file = StateFile(root / "state.json")
        self.state = self.state_file.load()
        self.public_key = load_public_key(config.security.public_key)
        self.greens = tuple(config.signal.green_phases)
        self.policy: OnnxPolicy | None = None  # the active model's session (None: fixed-time)
        self.candidate: OnnxPolicy | None = None  # the staged model's session, waiting for a phase-safe swap
        self.requested: dict[int, float] = {}
        self.next_request_at = 0.0
        self.deferred: bytes | None = None  # a newer command that arrived during probation, handled after it

    # -- persistence and reporting ---------------------------------------------------------------
    def save(self) -> None:
        self.state_file.save(self.state)

    def enter(self, state: DeployState) -> None:
        """Check the move against the transition table, persist the new state, then tell the server."""
        check_transition(self.state.state, state)
        self.state.state = state
        self.save()
        self.on_change()

    def report(self) -> dict[str, Any]:
        """The deployment's part of the device's retained report."""
        s = self.state
        job = None
        if s.job is not None:
            job = {"sha256": s.job.manifest["sha256"], "policy_version": s.job.manifest["policy_version"],
                   "seq": s.job.seq, "chunks_have": sum(s.job.have), "chunks_total": len(s.job.have),
                   "probation_decisions": s.job.probation_decisions,
                   "probation_needed": self.config.probation.decisions}
        return {"state": str(s.state), "active": asdict(s.active) if s.active else None,
                "previous": [asdict(p) for p in s.previous], "high_water": s.high_water,
                "desired_seq": s.desired_seq, "newest_issued": s.newest_issued, "error": s.error,
                "error_seq": s.error_seq, "job": job}

    def event(self, kind: str, detail: str) -> None:
        log.log(logging.WARNING if kind in ("refused", "failed", "rolled_back") else logging.INFO, "%s: %s", kind,
                detail)
        self.link.publish(device_topic(self.id, "events"),
                          encode({"device": self.id, "kind": kind, "detail": detail, "state": str(self.state.state),
                                  "ts": time.time()}))

    # -- models ----------------------------------------------------------------------------------
    def model_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.onnx"

    def part_path(self, sha256: str) -> Path:
        return self.downloads_dir / f"{sha256}.part"

    def load_policy(self, ref: ModelRef) -> OnnxPolicy:
        """A model already accepted, checked against its SHA-256 again: the file may have changed on disk since."""
        path = self.model_path(ref.sha256)
        if not path.is_file() or sha256_file(path) != ref.sha256:
            raise RELEDError(f"{path.name} is missing or no longer matches its SHA-256")
        inference = self.config.inference
        return OnnxPolicy(path, inference.threads, inference.providers)

    def recover(self) -> None:
        """Pick up where the last run stopped (the state was saved before each step)."""
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

    def on_reconnect(self) -> None:
        self.requested.clear()  # chunks asked for before the drop may never come: ask again

    # -- commands from the server ----------------------------------------------------------------
    def refuse(self, seq: int, reason: str) -> None:
        self.state.error, self.state.error_seq = reason, seq
        self.save()
        self.event("refused", reason)
        self.on_change()

    def on_desired(self, payload: bytes) -> None:
        """A signed command on the device's retained ``desired`` topic."""
        if not payload:
            return  # the retained command was cleared
        try:
            doc = verify(payload, self.public_key)
            seq, device, issued = command_fields(doc)
        except ProtocolError as exc:
            self.refuse(self.state.desired_seq, f"command refused: {exc}")
            return
        if device != self.id:
            self.refuse(self.state.desired_seq, f"command for device {device!r} refused (this is {self.id!r})")
            return
        if seq == self.state.desired_seq:
            return  # the retained copy of a command already handled
        if seq < self.state.desired_seq:
            self.refuse(self.state.desired_seq, f"replayed command refused (seq {seq} < {self.state.desired_seq})")
            return
        kind = doc.get("kind")
        if self.state.state is DeployState.PROBATION and kind == "deploy":
            manifest = doc.get("manifest") or {}  # COMMAND checked its fields
            if self.is_active(manifest.get("sha256"), manifest.get("policy_version")):
                self.state.desired_seq = seq  # the model on probation, sent again: probation goes on
                self.save()
                return
            if self.deferred is None:
                self.event("deferred", "a newer deploy waits until the model on probation is judged")
            self.deferred = payload
            return
        self.state.desired_seq = seq
        self.state.newest_issued = max(self.state.newest_issued, issued)
        if kind == "deploy":
            self.on_deploy(doc.get("manifest"), seq)
        else:  # the schema admits deploy and rollback only
            self.rollback("requested by the server", seq)

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
        if self.is_active(manifest.sha256, manifest.policy_version):
            self.abandon_job()
            self.state.error = ""
            self.enter(DeployState.COMMITTED)  # already running it (and past probation): a repeated deploy confirms it
            return
        job = self.state.job
        if self.state.state is DeployState.DOWNLOADING and job is not None and same_model(job.parsed, manifest):
            job.manifest, job.seq = manifest.to_dict(), seq  # the same deploy run again: resume the download
            self.state.error = ""
            self.requested.clear()
            self.save()
            self.on_change()
            self.event("downloading", f"policy v{manifest.policy_version}: resuming with {sum(job.have)}/"
                                      f"{len(job.have)} chunks")
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

    def is_active(self, sha256: str | None, policy_version: int | None) -> bool:
        """Whether this model is the one driving the signal now."""
        active = self.state.active
        return active is not None and (sha256, policy_version) == (active.sha256, active.policy_version)

    def manifest_problem(self, m: Manifest) -> str | None:
        config = self.config
        # a clock far behind cannot revive an expired manifest: time is at least what the server last vouched for
        if m.expires < max(time.time(), self.state.newest_issued):
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
    def download_step(self) -> None:
        """Ask for missing chunks (window, timeout and rate cap permitting); verify once all are in."""
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
        """A chunk on ``reled/v1/models/<sha256>/chunk/<i>``: checked against the signed manifest, then written."""
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
        if len(payload) != expected or sha256_bytes(payload) != manifest.chunks[index]:
            job.bad_chunks += 1
            self.requested.pop(index, None)
            self.event("refused", f"chunk {index} failed its hash check ({job.bad_chunks} bad so far)")
            if job.bad_chunks >= self.config.download.max_bad_chunks:
                self.fail(f"{job.bad_chunks} chunks failed their hash check: deployment abandoned")
            else:
                self.save()
            return
        part = self.part_path(manifest.sha256)
        with part.open("r+b" if part.exists() else "w+b") as fh:  # written in place: chunks arrive in any order
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

    def swap_if_staged(self) -> None:
        """Called at a phase-safe point (a green, at a decision): a staged model takes over, on probation."""
        if self.state.state is not DeployState.STAGED or self.candidate is None:
            return
        job = self.state.job
        assert job is not None
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
        """One decision of the active policy: during probation, count it towards commit or rollback."""
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
            self.state.high_water = max(self.state.high_water, version)  # only a committed model burns its version
            self.prune_models()
            self.enter(DeployState.COMMITTED)
            self.event("committed", f"policy v{version} passed probation")
            self.take_deferred()

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
        self.take_deferred()

    def take_deferred(self) -> None:
        """Probation was judged: the command that waited for it is handled now."""
        payload, self.deferred = self.deferred, None
        if payload is not None:
            self.on_desired(payload)

    def prune_models(self) -> None:
        keep = self.config.probation.keep_models
        for ref in self.state.previous[keep:]:
            self.model_path(ref.sha256).unlink(missing_ok=True)
        del self.state.previous[keep:]
