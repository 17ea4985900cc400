"""The controller's deploy state machine on its own: real files, keys and ONNX models, a fake broker link.

A hypothesis state machine throws random event sequences at one :class:`Deployment` (signed commands:
valid, replayed, tampered, signed by a stranger or for another device; good, bad and missing chunks;
crashes at any publish, rebuilt from the state file; clean restarts; healthy and unhealthy decisions
during probation) and checks after every step that only tabled transitions happened and that the active
model is a verified one: its file's SHA-256 is the one a validly signed manifest named.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from edge_runtime.device.deploy_state import TRANSITIONS, DeployState, IllegalTransition, StateFile
from edge_runtime.device.deployment import Deployment
from edge_runtime.device.device_config import DeviceConfig, load_device_config
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION
from edge_runtime.fileio import sha256_bytes, sha256_file
from edge_runtime.keys import KeyFolder
from edge_runtime.protocol import Manifest, chunk_topic, sign

DEVICE = "cabinet7"
INTERSECTION = "X"
GREENS = ("GGrr", "rrGG")
CHUNK = 256  # bytes: a model of a few KiB arrives in several chunks
GOOD_VERSIONS = (1, 2, 3, 5)
BAD_VERSION = 4  # its self-test fails on the device: the shadow test refuses it
# The scenario name in the metadata: long enough to span chunks, and changing a letter of it leaves a model that
# still loads and passes every check but the hashes, so a tampered chunk there is caught by the hashes alone.
HARMLESS = "s" * 600
ROOT = Path(__file__).resolve().parents[1]


def manifest_for(data: bytes, version: int, expired: bool = False) -> Manifest:
    """The signed manifest the server would send (fixed times, so every example draws the same bytes)."""
    chunks = tuple(sha256_bytes(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK))
    return Manifest(sha256=sha256_bytes(data), size=len(data), chunk_size=CHUNK, chunks=chunks,
                    schema_version=SCHEMA_VERSION, intersection=INTERSECTION, phase_table=GREENS,
                    policy_version=version, precision="fp32", expires=1.0 if expired else 4e9)


class World:
    """What every example shares: the server's keys, a stranger's key and the model files."""

    def __init__(self, root: Path, queue_policy: Callable[..., Path]):
        self.root = root
        self.keys = KeyFolder(root / "keys")
        self.keys.init([DEVICE])
        self.signing_key = self.keys.signing_key()
        self.stranger = Ed25519PrivateKey.generate()
        self.models: dict[int, bytes] = {}
        for version in (*GOOD_VERSIONS, BAD_VERSION):
            # logits = version × queue, so every version is another file; the bad one's self-test fails
            test_queue = np.random.default_rng(version).permutation(4 * MAX_PHASES).reshape(4, MAX_PHASES)
            path = queue_policy(root / f"v{version}.onnx", version=version, tables={INTERSECTION: list(GREENS)},
                                scenario=HARMLESS, test_queue=test_queue.astype(np.float32), n_phases=len(GREENS),
                                selftest_shift=5.0 if version == BAD_VERSION else 0.0)
            self.models[version] = path.read_bytes()
        self.by_sha = {sha256_bytes(data): data for data in self.models.values()}
        self.harmless = {sha: data.index(HARMLESS.encode()) for sha, data in self.by_sha.items()}

    def device_file(self, state_dir: Path) -> Path:
        """A device file for this controller (small probation, few bad chunks tolerated, one model kept)."""
        path = state_dir.parent / f"{state_dir.name}.toml"
        path.write_text(f"[device]\nid = {json.dumps(DEVICE)}\nintersection = {json.dumps(INTERSECTION)}\n"
                        f"state_dir = {json.dumps(str(state_dir))}\n"
                        f"[signal]\ngreen_phases = {json.dumps(list(GREENS))}\n"
                        f"[security]\npublic_key = {json.dumps(str(self.keys.public_key_path))}\n"
                        "[inference]\nlatency_budget_ms = 1000.0\n"  # the shadow test's timing is not under test
                        "[download]\nmax_bad_chunks = 3\n"
                        "[probation]\ndecisions = 3\nmax_failures = 1\nkeep_models = 1\n")
        return path


class Crash(Exception):
    """The process dies here (what SIGKILL or a power cut does between two steps)."""


class FakeLink:
    """The broker as the deployment sees it; ``crash_after`` kills the 'process' at a later publish."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes]] = []
        self.subscriptions: set[str] = set()
        self.crash_after: int | None = None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self.crash_after is not None:
            if self.crash_after == 0:
                self.crash_after = None
                raise Crash(topic)
            self.crash_after -= 1
        self.published.append((topic, payload))

    def subscribe(self, topic: str) -> None:
        self.subscriptions.add(topic)

    def unsubscribe(self, topic: str) -> None:
        self.subscriptions.discard(topic)


class RecordingDeployment(Deployment):
    """A Deployment that records every transition it makes (the test's view, independent of the table check)."""

    transitions: list[tuple[DeployState, DeployState]]

    def enter(self, state: DeployState) -> None:
        self.transitions.append((self.state.state, state))
        super().enter(state)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, queue_policy: Callable[..., Path]) -> World:
    return World(tmp_path_factory.mktemp("deploy-world"), queue_policy)


def test_the_transition_table_names_every_state():
    assert set(TRANSITIONS) == set(DeployState)
    assert {target for targets in TRANSITIONS.values() for target in targets} == set(DeployState)


def test_docs_show_the_transition_table():
    text = (ROOT / "docs" / "edge.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \|", text, flags=re.M))
    for state, targets in TRANSITIONS.items():
        assert state in rows, f"docs/edge.md lacks the row for {state}"
        assert set(re.findall(r"`(\w+)`", rows[state])) == set(targets), state


def test_entering_a_state_the_table_does_not_allow_raises(world, tmp_path):
    config = load_device_config(world.device_file(tmp_path / "state"))
    deployment = Deployment(config, FakeLink())
    deployment.recover()
    with pytest.raises(IllegalTransition, match="IDLE → PROBATION"):
        deployment.enter(DeployState.PROBATION)
    assert StateFile(tmp_path / "state" / "state.json").load().state is DeployState.IDLE  # nothing was persisted


class DeploymentMachine(RuleBasedStateMachine):
    world: World  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(dir=self.world.root, prefix="example-"))
        self.config: DeviceConfig = load_device_config(self.world.device_file(self.folder / "state"))
        self.link = FakeLink()
        self.seq = 0
        self.sent: list[bytes] = []  # valid signed commands, for replays and tampering
        self.signed_shas: set[str] = set()  # models a valid signed deploy for this device named
        self.transitions: list[tuple[DeployState, DeployState]] = []
        self.high_water = 0
        self.deployment = self.boot()

    # -- the process ------------------------------------------------------------------------------
    def boot(self) -> RecordingDeployment:
        """Start (or restart) the controller from its state folder, as the daemon does."""
        while True:
            deployment = RecordingDeployment(self.config, self.link, on_change=self.report)
            deployment.transitions = self.transitions
            persisted = deployment.state.state
            if self.transitions:
                assert persisted == self.transitions[-1][1], "a state was entered without being persisted first"
            try:
                deployment.recover()
                return deployment
            except Crash:
                continue  # it died again while recovering: start once more

    def report(self) -> None:
        self.link.publish(f"reled/v1/dev/{DEVICE}/reported", b"{}", retain=True)  # a crash point after each save

    def run(self, step: Any, *args: Any) -> bool:
        """Take one step; if the process dies in it, boot again. Returns whether it died."""
        try:
            step(*args)
        except Crash:
            self.deployment = self.boot()
            return True
        return False

    def command_payload(self, document: dict[str, Any], key: Ed25519PrivateKey | None = None) -> bytes:
        self.seq += 1
        return sign({"device": DEVICE, "seq": self.seq, "issued": 1.7e9 + self.seq, **document},
                    key or self.world.signing_key)

    @initialize()
    def start(self) -> None:
        assert self.deployment.state.state is DeployState.IDLE

    # -- commands -----------------------------------------------------------------------------------
    # One rule for every kind of command (weighted towards deploys), so the rules that move a deployment
    # forward get picked as often as the ones that disturb it.
    @rule(data=st.data(), kind=st.sampled_from(("deploy",) * 4 + ("expired deploy", "rollback", "replay", "tampered",
                                                                  "stranger", "other device")))
    def command(self, data: st.DataObject, kind: str) -> None:
        if kind in ("deploy", "expired deploy"):
            version = data.draw(st.sampled_from((*GOOD_VERSIONS, BAD_VERSION)))
            manifest = manifest_for(self.world.models[version], version, expired=kind == "expired deploy")
            payload = self.command_payload({"kind": "deploy", "manifest": manifest.to_dict()})
            self.sent.append(payload)
            if kind == "deploy":
                self.signed_shas.add(manifest.sha256)
            self.run(self.deployment.on_desired, payload)
        elif kind == "rollback":
            payload = self.command_payload({"kind": "rollback"})
            self.sent.append(payload)
            self.run(self.deployment.on_desired, payload)
        elif kind == "replay" and self.sent:
            payload = data.draw(st.sampled_from(self.sent))
            handled = json.loads(payload)["doc"]["seq"] <= self.deployment.state.desired_seq
            before = self.deployment.state.active
            died = self.run(self.deployment.on_desired, payload)  # (a restart may roll a probation back)
            if handled and not died:  # (a command the device died before persisting is new to it, and handled)
                assert self.deployment.state.active == before  # an old command changes nothing
        elif kind in ("tampered", "stranger", "other device"):
            self.forged(data, kind)

    def forged(self, data: st.DataObject, kind: str) -> None:
        """A command the device must refuse without any change but the error it reports."""
        manifest = manifest_for(self.world.models[GOOD_VERSIONS[-1]], GOOD_VERSIONS[-1]).to_dict()
        if kind == "tampered":
            payload = bytearray(self.command_payload({"kind": "deploy", "manifest": manifest}))
            payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.sampled_from((0x01, 0x20, 0xFF)))
            payload = bytes(payload)
        elif kind == "stranger":
            payload = self.command_payload({"kind": "deploy", "manifest": manifest}, key=self.world.stranger)
        else:
            payload = self.command_payload({"kind": "deploy", "manifest": manifest, "device": "cabinet8"})
        state = self.deployment.state
        before = (state.state, state.active, state.desired_seq)
        if not self.run(self.deployment.on_desired, payload):  # (a restart may roll a probation back)
            state = self.deployment.state
            assert (state.state, state.active, state.desired_seq) == before

    # -- the download -------------------------------------------------------------------------------
    def job_data(self) -> tuple[Manifest, bytes] | None:
        job = self.deployment.state.job
        if job is None:
            return None
        manifest = job.parsed
        return manifest, self.world.by_sha[manifest.sha256]

    @precondition(lambda self: self.deployment.state.state is DeployState.DOWNLOADING)
    @rule(data=st.data(), kind=st.sampled_from(("every missing one",) * 3 + ("good", "good", "bad", "another model's")))
    def chunk(self, data: st.DataObject, kind: str) -> None:
        current = self.job_data()
        assert current is not None
        manifest, model = current
        indices = range(len(manifest.chunks)) if kind == "every missing one" \
            else [data.draw(st.integers(0, len(manifest.chunks) - 1))]
        sha = manifest.sha256
        if kind == "another model's":
            model = self.world.models[data.draw(st.sampled_from(GOOD_VERSIONS))]
            sha = sha256_bytes(model)
        for index in indices:
            payload = bytearray(model[index * CHUNK:(index + 1) * CHUNK])
            if kind == "bad":
                start = self.world.harmless[sha] - index * CHUNK  # where the harmless letters start in this chunk
                harmless = range(max(0, start), min(len(payload), start + len(HARMLESS)))
                at = data.draw(st.sampled_from(harmless) if harmless else st.integers(0, len(payload) - 1))
                payload[at] ^= 0x01 if harmless else 0xFF
            self.run(self.deployment.on_chunk, chunk_topic(sha, index), bytes(payload))

    @precondition(lambda self: self.deployment.state.state is DeployState.DOWNLOADING)
    @rule()
    def download_step(self) -> None:
        self.run(self.deployment.download_step)

    # -- the signal loop ----------------------------------------------------------------------------
    @precondition(lambda self: self.deployment.policy is not None
                  or self.deployment.state.state is DeployState.STAGED)
    @rule(phase_safe=st.booleans(), health=st.lists(st.integers(0, 3).map(bool), min_size=1, max_size=6))
    def decisions(self, phase_safe: bool, health: list[bool]) -> None:
        """A few decisions (mostly healthy ones), as the daemon's loop takes them."""
        def decide(healthy: bool) -> None:
            if phase_safe:
                self.deployment.swap_if_staged()
            if self.deployment.policy is not None:
                self.deployment.probation_step(healthy, "" if healthy else "decision took 99 ms")
        for healthy in health:
            self.run(decide, healthy)

    # -- the process dying ----------------------------------------------------------------------------
    @rule(crash_after=st.sampled_from((None, 0, 1, 2, 3, 4)))
    def die(self, crash_after: int | None) -> None:
        """A clean restart now (None), or a crash at one of the next publishes (SIGKILL, power cut)."""
        self.link.crash_after = crash_after
        if crash_after is None:
            self.deployment = self.boot()

    # -- what must always hold ------------------------------------------------------------------------
    @invariant()
    def only_tabled_transitions(self) -> None:
        for old, new in self.transitions:
            assert new in TRANSITIONS[old], f"{old} → {new}"

    @invariant()
    def the_active_model_is_verified(self) -> None:
        d = self.deployment
        active = d.state.active
        assert (d.policy is None) == (active is None)
        if active is not None:
            path = d.model_path(active.sha256)
            assert path.exists() and sha256_file(path) == active.sha256
            assert active.sha256 in self.signed_shas
            assert d.policy.path == path and d.policy.meta.policy_version == active.policy_version

    @invariant()
    def state_is_persisted_and_consistent(self) -> None:
        state = self.deployment.state
        assert StateFile(self.deployment.state_file.path).load().state == state.state
        if state.state in (DeployState.DOWNLOADING, DeployState.STAGED, DeployState.PROBATION):
            assert state.job is not None
        assert state.high_water >= self.high_water  # anti-rollback never moves back
        self.high_water = state.high_water

    def teardown(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def test_random_event_sequences_keep_the_state_machine_and_the_active_model_sound(world):
    DeploymentMachine.world = world
    run_state_machine_as_test(DeploymentMachine, settings=settings(max_examples=60, stateful_step_count=60,
                                                                   deadline=None))
