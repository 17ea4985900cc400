"""The fleet for real: Mosquitto on loopback, 3 controller daemons (processes), signed deploys over MQTT.

The tests share one fleet and run in file order: each leaves the devices in a state it states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.mqtt import BrokerAddress, Link
from edge_runtime.policy import PolicyMetadata, SelfTest
from edge_runtime.protocol import device_topic, sign
from edge_runtime.server import Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from local_fleet import LocalFleet, wait_for

pytestmark = pytest.mark.slow
DEVICES = ("dev0", "dev1", "dev2")
FAST = {"runtime": {"decision_seconds": 1.0, "speed": 20.0},
        "probation": {"decisions": 10},
        "download": {"kbps": 8.0, "chunk_timeout": 1.0},
        "security": {"max_model_bytes": 1_000_000},
        # 4 daemons, the broker and pytest share this machine's 2 cores: a scheduling stall of a few ms is not the
        # policy's fault (a street controller has its CPU to itself and keeps the 5 ms default)
        "inference": {"latency_budget_ms": 50.0}}


def export(out: Path, version: int, seed: int) -> Model:
    proc = subprocess.run([sys.executable, "-m", "trainer", "export", "--scenario", "grid2x2", "--out", str(out),
                           "--policy-version", str(version), "--seed", str(seed), "--holdout-decisions", "20"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Model.load(out)


def failing_model(path: Path, tables: dict[str, list[str]], version: int) -> Path:
    """A model that passes its factory self-test but fails on the street: log(queue - 1000) is NaN below
    1000 queued vehicles, which the self-test's observations exceed and no real approach does."""
    obs = helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", feature_size()])
    mask = helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", MAX_PHASES])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", MAX_PHASES])
    action = helper.make_tensor_value_info("action", TensorProto.INT64, ["batch"])
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", MAX_PHASES), ("a", 1))]
    consts += [helper.make_tensor("offset", TensorProto.FLOAT, [], [1000.0]),
               helper.make_tensor("masked", TensorProto.FLOAT, [], [-1e9])]
    nodes = [helper.make_node("Slice", ["obs", "s", "e", "a"], ["queue"]),
             helper.make_node("Sub", ["queue", "offset"], ["shifted"]),
             helper.make_node("Log", ["shifted"], ["raw"]),
             helper.make_node("Where", ["mask", "raw", "masked"], ["logits"]),
             helper.make_node("ArgMax", ["logits"], ["action"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "failing", [obs, mask], [logits, action], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    test_obs = np.zeros((4, feature_size()), dtype=np.float32)
    test_obs[:, :MAX_PHASES] = np.arange(1002, 1002 + MAX_PHASES)
    test_mask = np.zeros((4, MAX_PHASES), dtype=bool)
    test_mask[:, :2] = True
    expected = np.where(test_mask, np.log(test_obs[:, :MAX_PHASES] - 1000), -1e9).astype(np.float32)
    meta = PolicyMetadata(1, feature_size(), MAX_PHASES, version, "fp32", "grid2x2", tables,
                          SelfTest(test_obs.tolist(), test_mask.tolist(), expected.tolist(),
                                   expected.argmax(1).tolist(), 1e-3))
    helper.set_model_props(model, meta.to_props())
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    models = {v: export(root / f"v{v}.onnx", v, seed=v) for v in (1, 2, 3)}
    tables = models[1].phase_tables
    lights = sorted(tables)
    f = LocalFleet(root)
    for k, device in enumerate(DEVICES):
        f.write_device(device, lights[k], tables[lights[k]], replay_seed=k, groups=("test",), **FAST)
    f.write_device("dev3", lights[3], tables[lights[3]], replay_seed=3, groups=("rollouts",),
                   runtime={"decision_seconds": 1.0, "speed": 500.0, "max_decisions": 10_000},
                   rollouts={"batch_rows": 250, "flush_seconds": 0.5, "resend_seconds": 3.0})
    f.init_keys()
    f.start_broker()
    observer = None
    try:
        for device in DEVICES:
            f.start_daemon(device)
        observer = f.observer()
        f.models, f.tables, f.lights, f.link = models, tables, lights, observer
        yield f
    finally:
        if observer is not None:
            observer.close()
        f.close()


def reported(fleet, device: str) -> dict:
    return fleet.link.reported.get(device, {})


def active_sha(fleet, device: str) -> str | None:
    return (reported(fleet, device).get("active") or {}).get("sha256")


def wait_event(fleet, device: str, needle: str, timeout: float = 20.0) -> dict:
    def found():
        return next((e for e in fleet.link.events.get(device, []) if needle in e["detail"]), None)

    return wait_for(found, timeout, f"an event on {device} saying {needle!r}", poll=lambda: fleet.link.pump(0.05))


def test_deploy_commits_on_all_three(fleet):
    proc = fleet.edge("deploy", "--group", "test", "--model", str(fleet.root / "v1.onnx"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3/3 committed" in proc.stdout
    sha = fleet.models[1].sha256
    wait_for(lambda: all(active_sha(fleet, d) == sha for d in DEVICES), 10, "v1 active everywhere",
             poll=lambda: fleet.link.pump(0.05))
    for device in DEVICES:
        rep = reported(fleet, device)
        assert rep["state"] == "COMMITTED" and rep["mode"] == "policy" and rep["high_water"] == 1
    status = fleet.edge("status")
    assert status.returncode == 0 and status.stdout.count("COMMITTED") == 3, status.stdout


def refusal(fleet, payload: bytes, needle: str, device: str = "dev0") -> None:
    """Publish a command as the server would; the device must refuse it and keep policy v1."""
    fleet.link.events.pop(device, None)
    fleet.link.link.publish(device_topic(device, "desired"), payload, retain=True).wait_for_publish(5)
    event = wait_event(fleet, device, needle)
    assert event["kind"] in ("refused", "failed")
    fleet.link.pump(0.5)
    assert active_sha(fleet, device) == fleet.models[1].sha256
    wait_for(lambda: reported(fleet, device).get("mode") == "policy", 10, f"{device} deciding with its policy",
             poll=lambda: fleet.link.pump(0.05))


def signed(fleet, document: dict, key=None) -> bytes:
    from edge_runtime.server import next_seq

    body = {**document, "device": document.get("device", "dev0"), "seq": next_seq(fleet.link.keys),
            "issued": time.time()}
    return sign(body, key or fleet.link.keys.signing_key())


def test_bad_commands_are_refused_and_the_active_model_stays(fleet):
    v2 = fleet.models[2]
    own = v2.manifest(fleet.lights[0], 65536, 3600).to_dict()
    refusal(fleet, b"{this is not json", "malformed JSON")
    refusal(fleet, signed(fleet, {"kind": "deploy", "manifest": own}, key=Ed25519PrivateKey.generate()),
            "bad signature")
    other = v2.manifest(fleet.lights[1], 65536, 3600).to_dict()
    refusal(fleet, signed(fleet, {"kind": "deploy", "manifest": other}), "for intersection")
    big = dict(own, size=2_000_000, chunks=["0" * 64] * 31)
    refusal(fleet, signed(fleet, {"kind": "deploy", "manifest": big}), "exceeds max_model_bytes")
    older = fleet.models[1].manifest(fleet.lights[0], 65536, 3600).to_dict()
    refusal(fleet, signed(fleet, {"kind": "deploy", "manifest": dict(older, policy_version=0)}), "anti-rollback")
    refusal(fleet, signed(fleet, {"kind": "deploy", "manifest": dict(own, expires=time.time() - 1)}), "expired")
    refusal(fleet, signed(fleet, {"kind": "deploy", "manifest": own, "device": "dev1"}), "for device 'dev1'")
    stale = sign({"kind": "deploy", "manifest": own, "device": "dev0", "seq": 5, "issued": 0},
                 fleet.link.keys.signing_key())
    refusal(fleet, stale, "replayed command")


def test_a_tampered_chunk_is_refused(fleet):
    v2 = fleet.models[2]
    tampered = bytearray(v2.data)
    tampered[len(tampered) // 2] ^= 0xFF
    fleet.link.serve(dataclasses.replace(v2, data=bytes(tampered)), 1024)  # sha256 still names the real model
    fleet.link.events.pop("dev0", None)
    fleet.link.command("dev0", {"kind": "deploy", "manifest": v2.manifest(fleet.lights[0], 1024, 3600).to_dict()})
    wait_event(fleet, "dev0", "failed its hash check")
    wait_event(fleet, "dev0", "deployment abandoned")
    fleet.link.pump(0.5)
    rep = reported(fleet, "dev0")
    assert rep["state"] == "FAILED" and active_sha(fleet, "dev0") == fleet.models[1].sha256
    assert rep["high_water"] == 1  # a model that never verified does not move the anti-rollback mark
    fleet.link.models.clear()


def test_a_broker_killed_mid_transfer_still_ends_in_a_commit(fleet):
    v2 = fleet.models[2]
    deploy = fleet.edge_background("deploy", "--group", "test", "--model", str(fleet.root / "v2.onnx"),
                                   "--chunk-size", "1024", "--timeout", "120", log=fleet.root / "deploy-v2.log")
    try:
        def downloading():
            job = (reported(fleet, "dev1").get("job") or {})
            return job.get("sha256") == v2.sha256 and 3 <= job.get("chunks_have", 0) < job["chunks_total"] - 5
        wait_for(downloading, 30, "dev1 part-way through the download", poll=lambda: fleet.link.pump(0.05))
        fleet.kill_broker()
        time.sleep(1.0)
        fleet.start_broker()
        assert deploy.wait(timeout=150) == 0, (fleet.root / "deploy-v2.log").read_text()
    finally:
        deploy.kill()
    assert "3/3 committed" in (fleet.root / "deploy-v2.log").read_text()
    wait_for(lambda: all(active_sha(fleet, d) == v2.sha256 for d in DEVICES), 20, "v2 active everywhere",
             poll=lambda: fleet.link.pump(0.05))


def test_a_daemon_killed_mid_download_resumes_and_commits(fleet):
    v3 = fleet.models[3]
    deploy = fleet.edge_background("deploy", "--device", "dev1", "--model", str(fleet.root / "v3.onnx"),
                                   "--chunk-size", "1024", "--timeout", "120", log=fleet.root / "deploy-v3.log")
    try:
        def part_way():
            job = fleet.state("dev1").get("job") or {}
            have = sum(job.get("have", []))
            return job.get("manifest", {}).get("sha256") == v3.sha256 and 5 <= have < len(job["have"]) - 5 and have
        have_at_kill = wait_for(part_way, 30, "dev1 part-way through the download")
        fleet.kill_daemon("dev1", signal.SIGKILL)
        saved = fleet.state("dev1")
        assert saved["state"] == "DOWNLOADING" and sum(saved["job"]["have"]) >= have_at_kill
        fleet.start_daemon("dev1")
        assert deploy.wait(timeout=150) == 0, (fleet.root / "deploy-v3.log").read_text()
    finally:
        deploy.kill()
    log = (fleet.root / "dev1.daemon.log").read_text()
    assert log.count("downloading: policy v3") == 1  # resumed from the saved chunks, not started over
    assert fleet.state("dev1")["active"]["sha256"] == v3.sha256


def test_devices_cannot_touch_each_others_topics(fleet):
    password = (fleet.keys / "credentials" / "dev0.secret").read_text().strip()
    address = BrokerAddress("127.0.0.1", fleet.port, "dev0", password)
    spy = Link(address, "spy-dev0", ["reled/v1/dev/dev1/#", "reled/v1/dev/+/rollouts", "reled/v1/dev/+/reported"])
    watcher = fleet.observer(["reled/v1/models/#", "reled/v1/dev/+/hil/#"])
    heard: list[str] = []
    forged: list[str] = []
    try:
        time.sleep(0.3)
        spy.start()
        spy.publish(device_topic("dev1", "desired"), b"forged").wait_for_publish(5)
        spy.publish(device_topic("dev1", "hil/act"), b"forged").wait_for_publish(5)
        spy.publish("reled/v1/models/" + "0" * 64 + "/chunk/0", b"forged").wait_for_publish(5)
        spy.publish(device_topic("dev0", "hil/act"), b"own").wait_for_publish(5)
        end = time.monotonic() + 2.5  # dev1 reports every second and streams rollouts meanwhile
        while time.monotonic() < end:
            watcher.pump(0.1, on_message=lambda m: heard.append(m.topic))
        seen = []
        while not spy.inbox.empty():
            seen.append(spy.inbox.get().topic)
        assert seen and all(t.startswith("reled/v1/dev/dev0/") for t in seen), seen  # its own report only
        assert device_topic("dev0", "hil/act") in heard  # a device may publish in its own subtree ...
        assert device_topic("dev1", "reported") in heard  # ... the server hears dev1 ...
        assert not forged, forged  # ... but nothing dev0 forged for dev1 or the model store arrived
    finally:
        spy.close()
        watcher.close()
    with pytest.raises(RELEDError, match="could not connect"):
        Link(BrokerAddress("127.0.0.1", fleet.port, "dev1", password), "impostor", []).start(timeout=3)
    with pytest.raises(RELEDError, match="could not connect"):
        Link(BrokerAddress("127.0.0.1", fleet.port, "", ""), "anonymous", []).start(timeout=3)


def test_a_failing_model_rolls_back_to_the_previous_one(fleet):
    path = failing_model(fleet.root / "failing.onnx", fleet.tables, version=10)
    before = active_sha(fleet, "dev2")
    assert before == fleet.models[2].sha256
    proc = fleet.edge("deploy", "--device", "dev2", "--model", str(path), timeout=120)
    assert proc.returncode == 1 and "probation failed" in proc.stdout, proc.stdout + proc.stderr
    fleet.link.pump(0.5)
    rep = reported(fleet, "dev2")
    assert rep["state"] == "ROLLED_BACK" and active_sha(fleet, "dev2") == before
    wait_for(lambda: reported(fleet, "dev2").get("mode") == "policy", 10, "dev2 deciding with its previous policy",
             poll=lambda: fleet.link.pump(0.05))
    assert not (fleet.root / "state" / "dev2" / "models" / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.onnx"
                ).exists()


def test_rollback_command_returns_to_the_previous_model(fleet):
    assert active_sha(fleet, "dev0") == fleet.models[2].sha256
    proc = fleet.edge("rollback", "--device", "dev0")
    assert proc.returncode == 0 and "policy v1" in proc.stdout, proc.stdout + proc.stderr
    wait_for(lambda: active_sha(fleet, "dev0") == fleet.models[1].sha256, 10, "dev0 back on v1",
             poll=lambda: fleet.link.pump(0.05))
    again = fleet.edge("deploy", "--device", "dev0", "--model", str(fleet.root / "v2.onnx"))
    assert again.returncode == 1 and "anti-rollback" in again.stdout  # v2 was accepted once: never again


def test_ten_thousand_decisions_arrive_exactly_once(fleet):
    out = fleet.root / "rollouts"
    collector = fleet.edge_background("collect", "--out", str(out), log=fleet.root / "collect.log")
    try:
        fleet.start_daemon("dev3")

        def recorded() -> int:
            return reported(fleet, "dev3").get("decisions", 0)

        wait_for(lambda: recorded() >= 2500, 60, "2,500 decisions", poll=lambda: fleet.link.pump(0.05))
        fleet.kill_broker()
        time.sleep(1.0)
        fleet.start_broker()
        wait_for(lambda: recorded() >= 5500, 60, "5,500 decisions", poll=lambda: fleet.link.pump(0.05))
        fleet.kill_daemon("dev3", signal.SIGKILL)
        fleet.start_daemon("dev3")

        def drained():
            rep = reported(fleet, "dev3")
            return rep.get("decisions") == 10_000 and rep.get("outbox_rows") == 0
        wait_for(drained, 120, "10,000 decisions acknowledged", poll=lambda: fleet.link.pump(0.05))
    finally:
        collector.send_signal(signal.SIGTERM)
        assert collector.wait(timeout=20) == 0
    from edge_runtime.rollouts import read_rollouts

    rows = read_rollouts(out, "dev3")
    decisions = np.sort(rows["decision"])
    assert len(decisions) == 10_000, (len(decisions), len(np.unique(decisions)))
    assert np.array_equal(decisions, np.arange(1, 10_001))  # every decision, once
    assert len(np.unique(rows["epoch"])) == 1
    assert rows["obs"].shape == (10_000, feature_size()) and np.isfinite(rows["reward"]).all()
