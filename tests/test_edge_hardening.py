"""The controller against hostile messages, a full disk and awkward command sequences, on real Mosquitto and
real daemons (the ``edge_fleet`` fixture). Every test checks that the signal kept being driven: the signal
log (what the actuator was told to show) grows, and the daemon is alive.

Hostile payloads are published with the server's credentials: since the ACL makes ``desired`` and
``rollouts/ack`` read-only for devices, that is the weakest position from which they can be sent at all
(a compromised broker or server account), and a device must survive it all the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import FLEET_FAST, random_value

from edge_runtime.device.deploy_state import DeployState
from edge_runtime.features import MAX_PHASES
from edge_runtime.fleet.server import Model, next_seq
from edge_runtime.protocol import chunk_topic, device_topic, sign
from edge_runtime.rollouts import read_rollouts

pytestmark = pytest.mark.slow
DEEP = b"[" * 100_000 + b"]" * 100_000  # under the size limit; json.loads alone raises RecursionError on it
CLOCK_HOOK = Path(__file__).parent / "clock_offset"


def signal_log(fleet, device: str) -> list[str]:
    path = fleet.local.root / f"{device}.signal.log"
    return path.read_text().splitlines() if path.exists() else []


def assert_driving(fleet, device: str, changes: int = 3, timeout: float = 60) -> None:
    """The daemon is alive and the actuator is told at least ``changes`` more signal states."""
    start = len(signal_log(fleet, device))
    fleet.wait(lambda: len(signal_log(fleet, device)) >= start + changes, timeout, f"{device} driving its signal")
    assert fleet.local.daemons[device].poll() is None, f"{device}'s daemon exited"


def publish(fleet, topic: str, payload: bytes, retain: bool = False) -> None:
    fleet.link.link.publish(topic, payload, retain=retain).wait_for_publish(10)


def faults(fleet, device: str) -> dict[str, int]:
    return fleet.reported(device).get("faults") or {}


def rewrite_device(fleet, name: str, **sections: dict) -> None:
    """Write device ``name``'s file again with these sections' keys changed (before its daemon starts)."""
    k = int(name[-1])
    tables = fleet.models[1].phase_tables
    merged = {section: dict(values) for section, values in FLEET_FAST.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    fleet.local.write_device(name, fleet.lights[k], tables[fleet.lights[k]], replay_seed=k, groups=("test",),
                             **merged)


def nan_policy(fleet, queue_policy, version: int = 10) -> Path:
    """A model that passes its self-test and returns NaN on every real approach (log(queue − 1000))."""
    test_queue = np.tile(np.arange(1002, 1002 + MAX_PHASES, dtype=np.float32), (4, 1))
    return queue_policy(fleet.local.root / f"nan-v{version}.onnx", version=version,
                        tables=fleet.models[1].phase_tables, scenario="grid2x2", test_queue=test_queue, n_phases=2,
                        offset=1000.0)


def test_deeply_nested_json_on_desired_and_acks_is_a_counted_fault(edge_fleet):
    fleet = edge_fleet("dev0")
    fleet.deploy(1, "dev0")
    publish(fleet, device_topic("dev0", "rollouts/ack"), DEEP)
    publish(fleet, device_topic("dev0", "rollouts/ack"), b'{"epoch": "x", "seq": []}')
    publish(fleet, device_topic("dev0", "desired"), DEEP, retain=True)
    fleet.wait(lambda: faults(fleet, "dev0").get("bad_message", 0) >= 2, 30, "dev0 counting the bad messages")
    fleet.wait_event("dev0", "arrays and objects")
    assert_driving(fleet, "dev0")
    # retained, it comes back on every restart: the daemon must start and drive all the same
    fleet.local.kill_daemon("dev0", signal.SIGKILL)
    fleet.link.events.pop("dev0", None)
    fleet.local.start_daemon("dev0")
    fleet.wait_event("dev0", "arrays and objects")
    assert_driving(fleet, "dev0")
    assert fleet.active_sha("dev0") == fleet.models[1].sha256
    fleet.wait(lambda: fleet.reported("dev0").get("mode") == "policy", 30, "dev0 deciding with its policy")


def test_signed_commands_with_garbled_fields_are_refused(edge_fleet):
    """What a stolen signing key or a server bug could send: valid signatures around wrong types and hostile
    values (a path in place of a hash, a 5,000-digit sequence number)."""
    fleet = edge_fleet("dev0")
    fleet.deploy(1, "dev0")
    key = fleet.link.keys.signing_key()
    good = fleet.models[2].manifest(fleet.lights[0], 65536, 3600).to_dict()
    bad_documents = [
        {"kind": "deploy", "device": "dev0", "seq": "12", "manifest": good},
        {"kind": "deploy", "device": ["dev0"], "seq": next_seq(fleet.link.keys), "manifest": good},
        {"kind": "deploy", "device": "dev0", "seq": next_seq(fleet.link.keys),
         "manifest": dict(good, sha256="../../../etc/passwd")},
        {"kind": "deploy", "device": "dev0", "seq": next_seq(fleet.link.keys), "manifest": dict(good, size=-5)},
        {"kind": "deploy", "device": "dev0", "seq": next_seq(fleet.link.keys),
         "manifest": dict(good, chunks=None)},
        {"kind": "deploy", "device": "dev0", "seq": next_seq(fleet.link.keys), "manifest": dict(good, expires=None)},
    ]
    for document in bad_documents:
        fleet.link.events.pop("dev0", None)
        publish(fleet, device_topic("dev0", "desired"), sign(document, key), retain=True)
        fleet.wait_event("dev0", "refused")
    huge = b'{"doc":{"kind":"rollback","device":"dev0","seq":' + b"9" * 5000 + b'},"sig":"AAAA"}'
    publish(fleet, device_topic("dev0", "desired"), huge, retain=True)
    fleet.wait_event("dev0", "malformed JSON")
    assert_driving(fleet, "dev0")
    assert fleet.active_sha("dev0") == fleet.models[1].sha256
    assert not any((fleet.local.root / "state" / "dev0").rglob("passwd*"))


def random_payload(rng: random.Random, fleet) -> bytes:
    """Random bytes, JSON and msgpack of random depth and size, and signed documents with random bodies."""
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.choice([0, 1, 10, 1000, 100_000]))
    if choice == 1:
        depth = rng.choice([1, 10, 1000, 50_000])
        return b"[" * depth + b"]" * rng.choice([depth, depth - 1, 0])
    if choice == 2:
        return json.dumps(random_value(rng, rng.randrange(8), wide=True)).encode()
    if choice == 3:
        return msgpack.packb(random_value(rng, rng.randrange(8), wide=False))
    if choice == 4:
        body = random_value(rng, 4, wide=True)
        document = body if isinstance(body, dict) else {"kind": body}
        document.update({"device": "dev0", "seq": next_seq(fleet.link.keys)})
        return sign(document, fleet.link.keys.signing_key())
    return b'{"epoch":' + str(rng.randrange(-2**70, 2**70)).encode() + b',"seq":' + b"7" * 4400 + b"}"


def test_fuzzing_every_topic_the_device_subscribes_to(edge_fleet):
    fleet = edge_fleet("dev0")
    fleet.deploy(1, "dev0")
    v2 = fleet.models[2]
    rng = random.Random(14)
    topics = [device_topic("dev0", "desired"), device_topic("dev0", "rollouts/ack"), chunk_topic(v2.sha256, 0),
              chunk_topic(v2.sha256, 10**30), chunk_topic("0" * 64, 1)]
    # the device listens on v2's chunk topics while it downloads v2 (slowly: 8 KiB/s, 1 KiB chunks)
    log = fleet.local.root / "deploy-v2.log"
    deploy = fleet.local.edge_background("deploy", "--device", "dev0", "--model", str(v2.path), "--chunk-size",
                                         "1024", "--timeout", "300", log=log)
    fleet.wait(lambda: (fleet.reported("dev0").get("job") or {}).get("sha256") == v2.sha256, 60, "dev0 downloading")
    sent, end = 0, time.monotonic() + 20
    while time.monotonic() < end:
        topic = rng.choice(topics[1:]) if rng.random() < 0.7 else topics[0]
        fleet.link.link.publish(topic, random_payload(rng, fleet), retain=rng.random() < 0.2)
        sent += 1
        fleet.pump()
        assert fleet.local.daemons["dev0"].poll() is None, "dev0's daemon died under fuzzing"
    assert sent > 200
    assert_driving(fleet, "dev0")
    publish(fleet, device_topic("dev0", "desired"), b"", retain=True)  # clear what the fuzzer left retained
    deploy.kill()
    deploy.wait(timeout=20)
    fleet.deploy(3, "dev0")  # and it still takes a genuine deployment
    assert_driving(fleet, "dev0")


@pytest.fixture
def small_disk(tmp_path: Path):
    """An 8 MiB tmpfs (root only), unmounted at teardown, after the daemons on it are stopped."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs for the full-disk test")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write until the filesystem is full (ENOSPC). Unbuffered: a buffered file kept the bytes of the write that
    failed and raised ENOSPC again when it was closed."""
    path = folder / "filler"
    path.touch()
    with contextlib.suppress(OSError), path.open("wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 65536)
    return path


def test_a_full_disk_does_not_stop_the_signal(small_disk, edge_fleet):
    fleet = edge_fleet()
    on_small_disk = {"state_dir": str(small_disk / "dev0")}
    rewrite_device(fleet, "dev0", device=on_small_disk)
    fleet.local.start_daemon("dev0")
    fleet.wait(lambda: "dev0" in fleet.link.reported, 60, "dev0 reporting")
    fleet.deploy(1, "dev0")
    out = fleet.local.root / "rollouts"

    def collect(name: str) -> subprocess.Popen:
        return fleet.local.edge_background("collect", "--out", str(out), log=fleet.local.root / f"{name}.log")

    collector = collect("collect-1")
    fleet.wait(lambda: fleet.reported("dev0").get("decisions", 0) >= 300, 60, "300 decisions recorded")
    collector.send_signal(signal.SIGTERM)  # nothing acknowledged from here on: the outbox must grow on disk
    assert collector.wait(timeout=30) == 0

    filler = fill(small_disk)
    fleet.wait(lambda: faults(fleet, "dev0").get("outbox_write", 0) >= 5, 60, "dev0 counting failed outbox writes")
    fleet.wait_event("dev0", "outbox_write")
    decided = fleet.reported("dev0")["decided"]
    assert_driving(fleet, "dev0")
    fleet.wait(lambda: fleet.reported("dev0").get("decided", 0) >= decided + 20, 30, "decisions on a full disk")
    assert fleet.reported("dev0")["mode"] == "policy"

    # a restart on the full disk starts and drives too
    fleet.local.kill_daemon("dev0", signal.SIGKILL)
    fleet.link.reported.pop("dev0", None)
    fleet.local.start_daemon("dev0")
    fleet.wait(lambda: fleet.reported("dev0").get("decided", 0) >= 20, 60, "decisions after a restart on a full disk")
    assert_driving(fleet, "dev0")
    assert fleet.reported("dev0")["mode"] == "policy"

    # space returns: recording resumes by itself ...
    filler.unlink()
    fleet.wait_event("dev0", "outbox_write works again")
    recorded = fleet.wait(lambda: fleet.reported("dev0").get("decisions"), 30, "a report")
    fleet.wait(lambda: fleet.reported("dev0").get("decisions", 0) >= recorded + 50, 60, "recording again")
    # ... and every decision recorded arrives exactly once (the daemon stops deciding at a limit, so it drains)
    fleet.local.kill_daemon("dev0", signal.SIGTERM)
    limit = fleet.reported("dev0")["decisions"] + 50
    rewrite_device(fleet, "dev0", device=on_small_disk, runtime={"max_decisions": limit})
    fleet.local.start_daemon("dev0")
    collector = collect("collect-2")

    def drained() -> bool:
        rep = fleet.reported("dev0")
        return rep.get("outbox_rows") == 0 and rep.get("decisions") == limit
    fleet.wait(drained, 120, "every recorded decision acknowledged")
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(timeout=30) == 0
    decisions = np.sort(read_rollouts(out, "dev0")["decision"])
    assert np.array_equal(decisions, np.arange(1, limit + 1)), "a recorded decision lost or duplicated"


def test_a_model_on_probation_is_judged_whatever_arrives_meanwhile(edge_fleet, queue_policy):
    fleet = edge_fleet()
    # decisions at real speed and a tolerant probation: the NaN model needs 21 decisions (21 s) to fail it
    rewrite_device(fleet, "dev0", runtime={"decision_seconds": 1.0, "speed": 1.0},
                   probation={"decisions": 30, "max_failures": 20})
    fleet.local.start_daemon("dev0")
    fleet.wait(lambda: "dev0" in fleet.link.reported, 60, "dev0 reporting")
    failing = Model.load(nan_policy(fleet, queue_policy))
    first = fleet.local.edge_background("deploy", "--device", "dev0", "--model", str(failing.path), "--timeout",
                                        "120", log=fleet.local.root / "deploy-nan.log")
    fleet.wait(lambda: fleet.reported("dev0").get("state") == DeployState.PROBATION, 60, "the NaN model on probation")
    # the same model sent again must not commit it ...
    again = fleet.link.command("dev0", {"kind": "deploy",
                                        "manifest": failing.manifest(fleet.lights[0], 65536, 3600).to_dict()})
    fleet.wait(lambda: fleet.reported("dev0").get("desired_seq") == again, 30, "dev0 taking the repeated command")
    assert fleet.reported("dev0")["state"] == DeployState.PROBATION
    # ... and a newer deploy waits for the judgement instead of cutting probation short
    second = fleet.local.edge_background("deploy", "--device", "dev0", "--model", str(fleet.models[2].path),
                                         "--timeout", "180", log=fleet.local.root / "deploy-v2.log")
    fleet.wait_event("dev0", "waits until the model on probation is judged")
    fleet.wait_event("dev0", "probation failed", timeout=90)
    assert second.wait(timeout=200) == 0, (fleet.local.root / "deploy-v2.log").read_text()
    assert first.wait(timeout=30) != 0
    fleet.wait(lambda: fleet.active_sha("dev0") == fleet.models[2].sha256, 30, "v2 active")
    committed = [e for e in fleet.link.events["dev0"] if e["kind"] == "committed"]
    assert [e["detail"] for e in committed] == ["policy v2 passed probation"]  # never the NaN model
    assert_driving(fleet, "dev0")


def test_the_heads_are_cleared_at_every_start(edge_fleet):
    fleet = edge_fleet("dev0")
    greens = fleet.models[1].phase_tables[fleet.lights[0]]
    lines = fleet.wait(lambda: len(signal_log(fleet, "dev0")) >= 3 and signal_log(fleet, "dev0"), 30, "3 states")
    first = [line.split() for line in lines[:3]]
    assert [f[1] for f in first] == ["YELLOW", "ALL_RED", "GREEN"], lines[:3]
    assert float(first[0][0]) < 1.0  # told at once (signal seconds at 20x), not at the first change 20-30 s later
    movements = [any(g[i] in "Gg" for g in greens) for i in range(len(greens[0]))]
    assert all((c == "y") == m for c, m in zip(first[0][4], movements, strict=True)), first[0]
    assert set(first[1][4]) <= set("rsOo")
    assert float(first[1][0]) >= 3.0 and float(first[2][0]) >= 5.0  # yellow 3 s, then all-red 2 s
    assert first[2][4] == greens[0]
    fleet.local.kill_daemon("dev0", signal.SIGTERM)
    before = len(signal_log(fleet, "dev0"))
    fleet.local.start_daemon("dev0")
    fleet.wait(lambda: len(signal_log(fleet, "dev0")) > before, 30, "the restarted daemon's first state")
    assert signal_log(fleet, "dev0")[before].split()[1] == "YELLOW"


def test_a_failed_candidate_does_not_burn_its_version(edge_fleet, queue_policy):
    fleet = edge_fleet()
    rewrite_device(fleet, "dev0", probation={"decisions": 300})  # 15 s of probation at 20 decisions/s
    fleet.local.start_daemon("dev0")
    fleet.wait(lambda: "dev0" in fleet.link.reported, 60, "dev0 reporting")
    test_queue = np.random.default_rng(2).permutation(4 * MAX_PHASES).reshape(4, MAX_PHASES).astype(np.float32)
    broken = queue_policy(fleet.local.root / "v2-broken.onnx", version=2, tables=fleet.models[1].phase_tables,
                          scenario="grid2x2", test_queue=test_queue, n_phases=2, selftest_shift=5.0)
    proc = fleet.local.edge("deploy", "--device", "dev0", "--model", str(broken), "--timeout", "120", timeout=200)
    assert proc.returncode == 1 and "shadow test failed" in proc.stdout, proc.stdout + proc.stderr
    assert fleet.reported("dev0")["high_water"] == 0
    # the genuine v2, interrupted by a restart during probation, then sent again
    log = fleet.local.root / "deploy-v2.log"
    deploy = fleet.local.edge_background("deploy", "--device", "dev0", "--model", str(fleet.models[2].path),
                                         "--timeout", "120", log=log)
    fleet.wait(lambda: fleet.reported("dev0").get("state") == DeployState.PROBATION, 60, "v2 on probation")
    fleet.local.kill_daemon("dev0", signal.SIGKILL)
    deploy.kill()
    deploy.wait(timeout=20)
    fleet.local.start_daemon("dev0")
    fleet.wait(lambda: fleet.reported("dev0").get("state") == DeployState.ROLLED_BACK, 60, "rolled back on restart")
    assert fleet.reported("dev0")["high_water"] == 0
    fleet.deploy(2, "dev0", timeout=120)
    assert fleet.reported("dev0")["high_water"] == 2
    assert_driving(fleet, "dev0")


def test_running_the_same_deploy_again_resumes_the_download(edge_fleet):
    fleet = edge_fleet()
    rewrite_device(fleet, "dev0", download={"kbps": 4.0, "chunk_timeout": 1.0})  # ~10 s for a 40 KB model
    fleet.local.start_daemon("dev0")
    fleet.wait(lambda: "dev0" in fleet.link.reported, 60, "dev0 reporting")
    v2 = fleet.models[2]
    args = ("deploy", "--device", "dev0", "--model", str(v2.path), "--chunk-size", "1024")
    first = fleet.local.edge_background(*args, "--timeout", "120", log=fleet.local.root / "deploy-1.log")

    def have() -> int:
        job = fleet.reported("dev0").get("job") or {}
        return job.get("chunks_have", 0) if job.get("sha256") == v2.sha256 else 0
    got = fleet.wait(lambda: have() >= 8 and have(), 60, "8 chunks downloaded")
    first.kill()
    first.wait(timeout=20)
    # a --timeout shorter than the whole download: it only ends a deploy that stops making progress
    proc = fleet.local.edge(*args, "--timeout", "4", timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = fleet.wait_event("dev0", "resuming with")["detail"]
    assert int(resumed.split("resuming with ")[1].split("/")[0]) >= got, resumed
    fleet.wait(lambda: fleet.active_sha("dev0") == v2.sha256, 30, "v2 active")


def test_a_clock_far_behind_does_not_revive_an_expired_manifest(edge_fleet):
    fleet = edge_fleet()
    fleet.local.start_daemon("dev0", env={"PYTHONPATH": str(CLOCK_HOOK), "RELED_TEST_CLOCK_OFFSET": "-86400"})
    fleet.wait(lambda: "dev0" in fleet.link.reported, 60, "dev0 reporting")
    assert fleet.reported("dev0")["ts"] < time.time() - 80_000  # the hook works: the device lives a day behind
    manifest = fleet.models[1].manifest(fleet.lights[0], 65536, 3600).to_dict()
    fleet.link.command("dev0", {"kind": "deploy", "manifest": dict(manifest, expires=time.time() - 3600)})
    fleet.wait_event("dev0", "expired")
    fleet.deploy(1, "dev0")  # a current manifest still deploys
    assert_driving(fleet, "dev0")


def test_a_model_replaced_on_disk_is_not_loaded(edge_fleet):
    """Physical access to the cabinet: the active model's file swapped for another (valid) policy while the
    daemon is down. The file no longer matches the SHA-256 it was accepted under, so it never drives."""
    fleet = edge_fleet("dev0")
    fleet.deploy(1, "dev0")
    fleet.local.kill_daemon("dev0", signal.SIGTERM)
    model = fleet.local.root / "state" / "dev0" / "models" / f"{fleet.models[1].sha256}.onnx"
    model.write_bytes(fleet.models[2].data)
    fleet.link.events.pop("dev0", None)
    fleet.local.start_daemon("dev0")
    fleet.wait_event("dev0", "no longer matches its SHA-256")
    fleet.wait(lambda: fleet.reported("dev0").get("mode") == "fallback" and fleet.active_sha("dev0") is None, 30,
               "dev0 on the fixed-time plan")
    assert_driving(fleet, "dev0")
