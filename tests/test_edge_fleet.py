"""The fleet for real: Mosquitto on loopback, controller daemons (processes), signed deploys over MQTT.

Each test starts its own fleet (the ``edge_fleet`` fixture in conftest.py: device files, keys, broker,
the daemons it names) and deploys what it needs first, so any one of them runs alone.
"""

from __future__ import annotations

import dataclasses
import signal
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.device.deploy_state import DeployState
from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.fileio import sha256_file
from edge_runtime.fleet.local import wait_for
from edge_runtime.fleet.server import next_seq
from edge_runtime.mqtt import BrokerAddress, Link
from edge_runtime.protocol import device_topic, sign

pytestmark = pytest.mark.slow
DEVICES = ("dev0", "dev1", "dev2")


def test_deploy_commits_on_all_three(edge_fleet):
    fleet = edge_fleet(*DEVICES)
    proc = fleet.local.edge("deploy", "--group", "test", "--model", str(fleet.models[1].path), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3/3 committed" in proc.stdout
    sha = fleet.models[1].sha256
    fleet.wait(lambda: all(fleet.active_sha(d) == sha for d in DEVICES), 30, "v1 active everywhere")
    fleet.wait(lambda: all(fleet.reported(d).get("mode") == "policy" for d in DEVICES), 30,
               "every device deciding with its policy")
    for device in DEVICES:
        rep = fleet.reported(device)
        assert rep["state"] == DeployState.COMMITTED and rep["high_water"] == 1
    status = fleet.local.edge("status")
    assert status.returncode == 0 and status.stdout.count("COMMITTED") == 3, status.stdout


def refusal(fleet, payload: bytes, needle: str, device: str = "dev0") -> None:
    """Publish a command as the server would; the device must refuse it and keep policy v1."""
    fleet.link.events.pop(device, None)
    fleet.link.link.publish(device_topic(device, "desired"), payload, retain=True).wait_for_publish(5)
    event = fleet.wait_event(device, needle)
    assert event["kind"] in ("refused", "failed")
    fleet.link.pump(0.5)
    assert fleet.active_sha(device) == fleet.models[1].sha256
    fleet.wait(lambda: fleet.reported(device).get("mode") == "policy", 30, f"{device} deciding with its policy")


def signed(fleet, document: dict, key=None) -> bytes:
    body = {**document, "device": document.get("device", "dev0"), "seq": next_seq(fleet.link.keys),
            "issued": time.time()}
    return sign(body, key or fleet.link.keys.signing_key())


def test_bad_commands_are_refused_and_the_active_model_stays(edge_fleet):
    fleet = edge_fleet("dev0")
    fleet.deploy(1, "dev0")
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


def test_a_tampered_chunk_is_refused(edge_fleet):
    fleet = edge_fleet("dev0")
    fleet.deploy(1, "dev0")
    v2 = fleet.models[2]
    tampered = bytearray(v2.data)
    tampered[len(tampered) // 2] ^= 0xFF
    fleet.link.serve(dataclasses.replace(v2, data=bytes(tampered)), 1024, ["dev0"])  # sha256: the real model
    fleet.link.events.pop("dev0", None)
    fleet.link.command("dev0", {"kind": "deploy", "manifest": v2.manifest(fleet.lights[0], 1024, 3600).to_dict()})
    fleet.wait_event("dev0", "failed its hash check")
    fleet.wait_event("dev0", "deployment abandoned")
    rep = fleet.wait(lambda: fleet.reported("dev0").get("state") == DeployState.FAILED and fleet.reported("dev0"),
                     30, "dev0 reporting FAILED")
    assert fleet.active_sha("dev0") == fleet.models[1].sha256
    assert rep["high_water"] == 1  # a model that never verified does not move the anti-rollback mark


def test_a_broker_killed_mid_transfer_still_ends_in_a_commit(edge_fleet):
    fleet = edge_fleet(*DEVICES)
    fleet.deploy(1, *DEVICES)
    v2 = fleet.models[2]
    log = fleet.local.root / "deploy-v2.log"
    deploy = fleet.local.edge_background("deploy", "--group", "test", "--model", str(v2.path), "--chunk-size", "1024",
                                         "--timeout", "120", log=log)

    def downloading():
        job = (fleet.reported("dev1").get("job") or {})
        return job.get("sha256") == v2.sha256 and 3 <= job.get("chunks_have", 0) < job["chunks_total"] - 5
    fleet.wait(downloading, 30, "dev1 part-way through the download")
    fleet.local.kill_broker()
    time.sleep(1.0)  # the devices and the deploy lose the broker for a while
    fleet.local.start_broker()
    assert deploy.wait(timeout=150) == 0, log.read_text()
    assert "3/3 committed" in log.read_text()
    fleet.wait(lambda: all(fleet.active_sha(d) == v2.sha256 for d in DEVICES), 30, "v2 active everywhere")


def test_a_daemon_killed_mid_download_resumes_and_commits(edge_fleet):
    fleet = edge_fleet("dev1")
    fleet.deploy(1, "dev1")
    v3 = fleet.models[3]
    log = fleet.local.root / "deploy-v3.log"
    deploy = fleet.local.edge_background("deploy", "--device", "dev1", "--model", str(v3.path), "--chunk-size",
                                         "1024", "--timeout", "120", log=log)

    def part_way():
        job = fleet.local.state("dev1").get("job") or {}
        have = sum(job.get("have", []))
        return job.get("manifest", {}).get("sha256") == v3.sha256 and 5 <= have < len(job["have"]) - 5 and have
    have_at_kill = fleet.wait(part_way, 30, "dev1 part-way through the download")
    fleet.local.kill_daemon("dev1", signal.SIGKILL)
    saved = fleet.local.state("dev1")
    assert saved["state"] == DeployState.DOWNLOADING and sum(saved["job"]["have"]) >= have_at_kill
    fleet.local.start_daemon("dev1")
    assert deploy.wait(timeout=150) == 0, log.read_text()
    daemon_log = (fleet.local.root / "dev1.daemon.log").read_text()
    assert daemon_log.count("downloading: policy v3") == 1  # resumed from the saved chunks, not started over
    assert fleet.local.state("dev1")["active"]["sha256"] == v3.sha256


def test_devices_cannot_touch_each_others_topics(edge_fleet):
    fleet = edge_fleet("dev1")  # the spy is dev0: a device user has one session (its user name is its client id)
    password = (fleet.local.keys / "credentials" / "dev0.secret").read_text().strip()
    address = BrokerAddress("127.0.0.1", fleet.local.port, "dev0", password)
    spy = Link(address, "spy-dev0", ["reled/v1/dev/dev1/#", "reled/v1/dev/+/rollouts", "reled/v1/dev/+/reported"])
    watcher = fleet.local.observer(["reled/v1/models/#", "reled/v1/dev/+/hil/#"])
    heard: list[tuple[str, bytes]] = []

    def listen() -> None:
        watcher.pump(0.1, on_message=lambda m: heard.append((m.topic, m.payload)))

    def topics() -> set[str]:
        return {topic for topic, _ in heard}

    try:
        # the watcher's subscriptions are in place once it receives the retained reports
        wait_for(lambda: device_topic("dev1", "reported") in topics(), 30, "the watcher's subscriptions", poll=listen)
        spy.start()
        spy.publish(device_topic("dev1", "desired"), b"forged").wait_for_publish(5)
        spy.publish(device_topic("dev1", "hil/act"), b"forged").wait_for_publish(5)
        spy.publish("reled/v1/models/" + "0" * 64 + "/chunk/0", b"forged").wait_for_publish(5)
        spy.publish(device_topic("dev0", "hil/act"), b"own").wait_for_publish(5)
        spy.publish(device_topic("dev0", "reported"), b'{"device": "dev0"}').wait_for_publish(5)
        # a device may publish in its own subtree: the server hears it after everything dev0 published before
        wait_for(lambda: device_topic("dev0", "hil/act") in topics(), 30, "dev0's own message", poll=listen)
        seen: list[str] = []

        def spy_heard() -> bool:
            while not spy.inbox.empty():
                seen.append(spy.inbox.get().topic)
            return bool(seen)
        fleet.wait(spy_heard, 30, "the spy's own report")
        end = time.monotonic() + 2.5  # dev1 reports every second and streams rollouts meanwhile
        while time.monotonic() < end:
            listen()
        spy_heard()
        assert all(t.startswith("reled/v1/dev/dev0/") for t in seen), seen  # its own report only
        forged = [topic for topic, payload in heard if payload == b"forged"]
        assert not forged, forged  # nothing dev0 forged for dev1 or the model store arrived
    finally:
        spy.close()
        watcher.close()
    with pytest.raises(RELEDError, match="could not connect"):
        Link(BrokerAddress("127.0.0.1", fleet.local.port, "dev1", password), "impostor", []).start(timeout=3)
    with pytest.raises(RELEDError, match="could not connect"):
        Link(BrokerAddress("127.0.0.1", fleet.local.port, "", ""), "anonymous", []).start(timeout=3)


def test_a_failing_model_rolls_back_to_the_previous_one(edge_fleet, queue_policy):
    fleet = edge_fleet("dev2")
    fleet.deploy(1, "dev2")
    fleet.deploy(2, "dev2")
    # log(queue - 1000) is NaN below 1000 queued vehicles: the self-test's queues exceed it, no real approach does,
    # so the model passes its factory self-test and fails on the street
    test_queue = np.tile(np.arange(1002, 1002 + MAX_PHASES, dtype=np.float32), (4, 1))
    path = queue_policy(fleet.local.root / "failing.onnx", version=10, tables=fleet.models[1].phase_tables,
                        scenario="grid2x2", test_queue=test_queue, n_phases=2, offset=1000.0)
    before = fleet.active_sha("dev2")
    assert before == fleet.models[2].sha256
    proc = fleet.local.edge("deploy", "--device", "dev2", "--model", str(path), timeout=180)
    assert proc.returncode == 1 and "probation failed" in proc.stdout, proc.stdout + proc.stderr
    fleet.wait(lambda: fleet.reported("dev2").get("state") == DeployState.ROLLED_BACK, 30, "dev2 reporting ROLLED_BACK")
    assert fleet.active_sha("dev2") == before
    fleet.wait(lambda: fleet.reported("dev2").get("mode") == "policy", 30, "dev2 deciding with its previous policy")
    assert not (fleet.local.root / "state" / "dev2" / "models" / f"{sha256_file(path)}.onnx").exists()


def test_rollback_command_returns_to_the_previous_model(edge_fleet):
    fleet = edge_fleet("dev0")
    fleet.deploy(1, "dev0")
    fleet.deploy(2, "dev0")
    assert fleet.active_sha("dev0") == fleet.models[2].sha256
    proc = fleet.local.edge("rollback", "--device", "dev0")
    assert proc.returncode == 0 and "policy v1" in proc.stdout, proc.stdout + proc.stderr
    fleet.wait(lambda: fleet.active_sha("dev0") == fleet.models[1].sha256, 30, "dev0 back on v1")
    again = fleet.local.edge("deploy", "--device", "dev0", "--model", str(fleet.models[2].path))
    assert again.returncode == 1 and "anti-rollback" in again.stdout  # v2 was accepted once: never again


def test_ten_thousand_decisions_arrive_exactly_once(edge_fleet):
    fleet = edge_fleet()
    out = fleet.local.root / "rollouts"
    collector = fleet.local.edge_background("collect", "--out", str(out), log=fleet.local.root / "collect.log")
    fleet.local.start_daemon("dev3")

    def recorded() -> int:
        return fleet.reported("dev3").get("decisions", 0)

    fleet.wait(lambda: recorded() >= 2500, 120, "2,500 decisions")
    fleet.local.kill_broker()
    time.sleep(1.0)  # the daemon and the collector lose the broker for a while
    fleet.local.start_broker()
    fleet.wait(lambda: recorded() >= 5500, 120, "5,500 decisions")
    fleet.local.kill_daemon("dev3", signal.SIGKILL)
    fleet.local.start_daemon("dev3")

    def drained():
        rep = fleet.reported("dev3")
        return rep.get("decisions") == 10_000 and rep.get("outbox_rows") == 0
    fleet.wait(drained, 180, "10,000 decisions acknowledged")
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(timeout=20) == 0
    from edge_runtime.rollouts import read_rollouts

    rows = read_rollouts(out, "dev3")
    decisions = np.sort(rows["decision"])
    assert len(decisions) == 10_000, (len(decisions), len(np.unique(decisions)))
    assert np.array_equal(decisions, np.arange(1, 10_001))  # every decision, once
    assert len(np.unique(rows["epoch"])) == 1
    assert rows["obs"].shape == (10_000, feature_size()) and np.isfinite(rows["reward"]).all()
