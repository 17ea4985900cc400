"""The fleet tools (status, deploy, rollback, collect) against hostile devices.

Every message the server side reads passes a schema (edge_runtime/schema.py): a device that sends garbage is
listed as invalid and skipped, the rest of the fleet is served. One collector per fleet; rollout batches that
would poison the store are refused; what the tools keep per device is bounded; chunks go only to a deploy's
targets. The first tests drive the pieces directly; the slow ones use real Mosquitto, daemons and credentials
(the hostile messages are published with a device's own credentials, all that an attacker holding one has).
"""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from conftest import FUZZ_NAMES, random_value
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.fleet.chunks import BURST, RATE, REPEAT_WINDOW, ChunkServer
from edge_runtime.fleet.collector import REGISTRATION_TOPIC
from edge_runtime.fleet.server import EVENTS_KEPT, ServerLink
from edge_runtime.keys import KeyFolder
from edge_runtime.mqtt import BrokerAddress, Inbox, Link, Message
from edge_runtime.protocol import ProtocolError, chunk_topic, device_topic, encode, sign
from edge_runtime.rollouts import Batch, batch_path, pack, read_rollouts, unpack
from edge_runtime.schema import REPORTED, validate

DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB, under the 256 KiB limit
HUGE_INT_STATUS = b'{"online": true, "device": "dev3", "ts": ' + b"9" * 5000 + b"}"
WRONG_SHAPE = b'{"active": 5}'


def report(device: str, **changes: Any) -> dict[str, Any]:
    """A device's retained report as the daemon writes it."""
    return {"device": device, "intersection": "X", "state": "COMMITTED",
            "active": {"sha256": "a" * 64, "policy_version": 3}, "previous": [], "high_water": 3, "desired_seq": 7,
            "error": "", "error_seq": 0, "job": None, "mode": "policy", "decisions": 10, "outbox_rows": 0, "ts": 1.0,
            **changes}


def columns(rows: int, first: int = 1) -> dict[str, np.ndarray]:
    return {"decision": np.arange(first, first + rows), "time": np.zeros(rows), "obs": np.zeros((rows, feature_size())),
            "mask": np.ones((rows, MAX_PHASES), bool), "action": np.zeros(rows), "log_prob": np.zeros(rows),
            "override": np.zeros(rows, bool), "reward": np.zeros(rows), "source": np.zeros(rows),
            "policy_version": np.zeros(rows)}


def repack(batch: Batch, **changes: Any) -> bytes:
    """A packed batch with some of its fields replaced (what a hostile device can send)."""
    body = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(pack(batch)))
    body.update(changes)
    return zstandard.ZstdCompressor().compress(msgpack.packb(body, use_bin_type=True))


# -- the pieces ------------------------------------------------------------------------------------
def test_the_schema_names_the_bad_field_and_drops_unknown_keys():
    newer = validate(report("d", faults={"outbox": 2}, future_field={"x": [1]}), REPORTED)
    assert "future_field" not in newer and newer["faults"] == {"outbox": 2} and newer["job"] is None
    cases = {
        "active": {"active": 5},
        "decisions": {"decisions": True},
        "desired_seq": {"desired_seq": -1},
        "error_seq": {"error_seq": 2**63},
        "ts": {"ts": float("nan")},
        "error": {"error": "\x1b]52;c;payload\x07"},
        "previous": {"previous": [{"sha256": "a" * 64, "policy_version": 1}] * 65},
        "job.sha256": {"job": {"sha256": "../x", "policy_version": 1, "seq": 1, "chunks_have": 0,
                               "chunks_total": 1}},
        "faults key": {"faults": {"x" * 100: 1}},
    }
    for field, change in cases.items():
        with pytest.raises(ProtocolError, match=f"^{re.escape(field)}"):
            validate(report("d", **change), REPORTED)
    with pytest.raises(ProtocolError, match=r"^state: missing"):
        validate({k: v for k, v in report("d").items() if k != "state"}, REPORTED)


@pytest.fixture
def server(tmp_path: Path) -> ServerLink:
    """A ServerLink that is never connected: messages are put on its inbox as paho would."""
    keys = KeyFolder(tmp_path / "keys")
    keys.init(["dev0", "dev1"])
    return ServerLink(keys, BrokerAddress(), "test")


def deliver(server: ServerLink, device: str, leaf: str, payload: bytes) -> None:
    server.link.inbox.put(Message(device_topic(device, leaf), payload, retain=True))
    server.pump(0.01)


def test_the_server_keeps_valid_documents_and_lists_bad_devices_as_invalid(server):
    deliver(server, "dev0", "reported", encode(report("dev0")))
    deliver(server, "dev0", "status", encode({"online": True, "device": "dev0", "pid": 4, "ts": 1.0}))
    deliver(server, "dev1", "reported", encode(report("dev1")))
    deliver(server, "dev1", "reported", WRONG_SHAPE)
    deliver(server, "dev1", "status", HUGE_INT_STATUS)
    deliver(server, "dev1", "events", DEEP)
    deliver(server, "dev1", "desired", sign({"kind": "rollback", "device": "dev1", "seq": 1, "issued": 1.0},
                                            Ed25519PrivateKey.generate()))
    assert set(server.reported) == {"dev0"} and server.reported["dev0"]["active"]["policy_version"] == 3
    assert server.status["dev0"]["online"] is True
    reason = server.invalid["dev1"]
    for needle in ("reported: active: expected an object", "status: malformed JSON", "events: message with over",
                   "desired: bad signature"):
        assert needle in reason, reason
    assert "dev0" not in server.invalid
    deliver(server, "dev1", "reported", encode(report("dev0")))  # a report naming another device
    assert "reported: device: names another device" in server.invalid["dev1"]
    deliver(server, "dev1", "reported", encode(report("dev1")))  # a valid one replaces the refusal
    assert server.reported["dev1"]["state"] == "COMMITTED" and "reported" not in server.invalid["dev1"]
    command = {"kind": "rollback", "device": "dev1", "seq": 2, "issued": 2.0}
    deliver(server, "dev1", "desired", sign(command, server.keys.signing_key()))
    assert server.desired["dev1"] == {**command, "manifest": None} and "desired" not in server.invalid["dev1"]
    for topic in ("reled/v1/dev/a b/reported", "reled/v1/dev/../reported", "reled/v1/dev/dev0/hil/act"):
        server.link.inbox.put(Message(topic, WRONG_SHAPE, retain=False))
    server.pump(0.01)
    assert set(server.invalid) == {"dev1"}


def test_what_the_server_holds_is_bounded(server):
    for i in range(5000):
        server.link.inbox.put(Message(device_topic("dev0", "events"), encode(
            {"device": "dev0", "kind": "fallback", "detail": f"event {i} " + "x" * 1000, "state": "IDLE",
             "ts": 1.0}), retain=False))
    server.pump(0.01)
    assert len(server.events["dev0"]) == EVENTS_KEPT and server.events["dev0"][-1]["detail"].startswith("event 4999")
    inbox = Inbox(max_bytes=1000)  # what waits to be handled: a flood is dropped (and sent again), not queued
    assert [inbox.offer(Message("t", bytes(400), False)) for _ in range(3)] == [True, True, False]
    inbox.get()
    assert inbox.offer(Message("t", bytes(400), False)) and inbox.dropped == 1 and inbox.bytes == 800


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_chunks_go_to_targets_only_once_per_window_and_within_the_rate():
    sent: list[tuple[str, int]] = []
    clock = FakeClock()
    chunks = ChunkServer(lambda topic, data: sent.append((topic, len(data))), clock)
    size = 64 * 1024
    sha = "b" * 64
    chunks.add(sha, bytes(size * 256), size, ["dev0"])
    for _ in range(50):  # the attack: 50 requests of 64 chunks from a device that is not a target
        chunks.answer("dev9", sha, list(range(64)))
    assert not sent and chunks.refused == 50 * 64
    chunks.answer("dev0", "c" * 64, [0])  # another deploy's model: not this process's to answer or count
    assert not sent and chunks.refused == 50 * 64
    chunks.answer("dev0", sha, [0, 1, 2])
    chunks.answer("dev0", sha, [0, 1, 2])  # asked again at once: it is on its way
    assert [t for t, _ in sent] == [chunk_topic(sha, i) for i in range(3)]
    clock.now += REPEAT_WINDOW
    chunks.answer("dev0", sha, [0, 10**9])  # again after the window: sent; out of range: refused
    assert len(sent) == 4 and chunks.refused == 50 * 64 + 3 + 1
    for start in range(3, 256, 64):  # the burst (refilled by now) lets a whole 8 MiB model through at once,
        chunks.answer("dev0", sha, list(range(start, min(start + 64, 256))))  # then the rate caps it
    assert sum(n for _, n in sent[3:]) == BURST
    clock.now += 1.0
    chunks.answer("dev0", sha, list(range(200, 256)))
    assert sum(n for _, n in sent[3:]) == BURST + RATE


def test_a_batch_with_a_negative_epoch_is_refused_and_strays_do_not_break_read_rollouts(tmp_path, caplog):
    good = Batch("dev0", 5, 1, columns(3))
    packed_columns = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(pack(good)))["columns"]
    bad = {
        "epoch: integer outside": repack(good, epoch=-1),
        "seq: integer outside": repack(good, seq=-7),
        "epoch: expected an integer": repack(good, epoch=True),
        "device: string not of the form": repack(good, device="../../etc"),
        "rows: integer outside": repack(good, rows=0),
        "columns.obs: 4 bytes for 3 rows": repack(good, columns={**packed_columns, "obs": b"\0" * 4}),
        "format: expected one of": repack(good, format="other/1"),
        "malformed rollout batch": zstandard.ZstdCompressor().compress(b"\x91" * 100_000),
    }
    for needle, payload in bad.items():
        with pytest.raises(ProtocolError, match=needle):
            unpack(payload)
    assert unpack(pack(good)).epoch == 5
    out = tmp_path / "rollouts"
    path = batch_path(out, "dev0", 5, 1)
    path.parent.mkdir(parents=True)
    np.savez(path, **unpack(pack(good)).columns)
    strays = {  # what an older collector could have written, and files that are not batches at all
        out / "dev0" / f"{-1:016x}" / "0000000001.npz": path.read_bytes(),
        out / "dev0" / f"{5:016x}" / "0000000002.npz": b"not a zip",
        out / "dev1 x" / f"{5:016x}" / "0000000001.npz": path.read_bytes(),
    }
    for stray, data in strays.items():
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(data)
    np.savez(out / "dev0" / f"{5:016x}" / "0000000003.npz", decision=np.arange(2))  # columns missing
    np.savez(out / "dev0" / f"{5:016x}" / "0000000004.npz", **dict(columns(2), obs=np.zeros((2, 3))))  # bad shape
    with caplog.at_level(logging.WARNING, logger="edge_runtime.rollouts"):
        rows = read_rollouts(out)
    assert list(rows["decision"]) == [1, 2, 3] and set(rows["device"]) == {"dev0"}
    assert "skipped 5 file(s)" in caplog.text
    assert list(read_rollouts(out, "dev0")["decision"]) == [1, 2, 3]


# -- real Mosquitto, real daemons -----------------------------------------------------------------
def device_link(fleet, device: str) -> Link:
    """A connection with ``device``'s own credentials (its daemon must not be running: same client id)."""
    password = KeyFolder(fleet.local.keys).password(device)
    return Link(BrokerAddress("127.0.0.1", fleet.local.port, device, password), device, []).start()


def row(output: str, device: str) -> str:
    """The first line of ``device``'s row in a rich table."""
    return next((line for line in output.splitlines() if f" {device} " in line), "")


@pytest.mark.slow
def test_hostile_retained_messages_leave_every_fleet_tool_serving(edge_fleet):
    fleet = edge_fleet("dev0", "dev1")
    hostile = device_link(fleet, "dev3")
    marked = device_link(fleet, "dev2")
    try:
        for leaf, payload in (("events", DEEP), ("status", HUGE_INT_STATUS), ("reported", WRONG_SHAPE),
                              ("rollouts", b"\x28\xb5\x2f\xfd garbage")):
            hostile.publish(device_topic("dev3", leaf), payload, retain=True).wait_for_publish(10)
        marked.publish(device_topic("dev2", "reported"), encode(report("dev2", state="[/bold]", error="[red]x[/]")),
                       retain=True).wait_for_publish(10)
    finally:
        hostile.close()
        marked.close()
    fleet.wait(lambda: all(f"{leaf}: " in fleet.link.invalid.get("dev3", "") for leaf in ("events", "status",
                                                                                          "reported"))
               and "dev2" in fleet.link.reported, 30, "the observer refusing dev3's messages and keeping dev2's report")
    status = fleet.local.edge("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "IDLE" in row(status.stdout, "dev0") and "IDLE" in row(status.stdout, "dev1"), status.stdout
    assert "invalid" in row(status.stdout, "dev3") and "[/bold]" in row(status.stdout, "dev2"), status.stdout
    deploy = fleet.local.edge("deploy", "--device", "dev0", "--device", "dev1", "--model",
                              str(fleet.models[1].path), "--timeout", "120", timeout=200)
    assert deploy.returncode == 0 and "2/2 committed" in deploy.stdout, deploy.stdout + deploy.stderr
    rollback = fleet.local.edge("rollback", "--device", "dev0")
    assert rollback.returncode == 0 and "fixed-time plan" in rollback.stdout, rollback.stdout + rollback.stderr
    refused = fleet.local.edge("deploy", "--device", "dev3", "--model", str(fleet.models[1].path), "--timeout", "3")
    assert refused.returncode == 1 and "invalid" in refused.stdout and "Traceback" not in refused.stderr, \
        refused.stdout + refused.stderr
    collect = fleet.local.edge("collect", "--out", str(fleet.local.root / "rollouts"), "--seconds", "2")
    assert collect.returncode == 0 and "1 refused" in collect.stdout, collect.stdout + collect.stderr


def registrations(watcher: ServerLink, seen: list[bytes]) -> list[bytes]:
    watcher.pump(0.05, on_message=lambda m: seen.append(m.payload) if m.topic == REGISTRATION_TOPIC else None)
    return seen


@pytest.mark.slow
def test_a_second_collector_is_refused_and_a_dead_one_gives_way(edge_fleet, assert_one_line_error):
    fleet = edge_fleet()
    local = fleet.local
    watcher = local.observer([REGISTRATION_TOPIC])
    seen: list[bytes] = []
    first = local.edge_background("collect", "--out", str(local.root / "a"), log=local.root / "a.log")

    def holder() -> dict[str, Any] | None:
        registrations(watcher, seen)
        return json.loads(seen[-1]) if seen and seen[-1] else None

    fleet.wait(lambda: (holder() or {}).get("pid") == first.pid, 60, "the first collector's registration")
    other = local.edge("collect", "--out", str(local.root / "b"), "--seconds", "5")
    assert_one_line_error(other, "one collector per fleet", str(local.root / "a"))
    same = local.edge("collect", "--out", str(local.root / "a"), "--seconds", "5")
    assert_one_line_error(same, "is writing to")
    first.kill()  # the kernel closes its socket: the broker publishes its will, which clears the registration
    first.wait(timeout=20)  # reaped: its pid is gone
    fleet.wait(lambda: holder() is None, 30, "the killed collector's will")

    def retain(payload: bytes) -> None:
        watcher.link.publish(REGISTRATION_TOPIC, payload, retain=True).wait_for_publish(10)

    def claim(**fields: Any) -> bytes:
        """A registration as another collector would have published it."""
        return encode({"id": "other", "out": "/elsewhere", "host": socket.gethostname(), "pid": first.pid,
                       "started": time.time(), **fields})

    retain(claim())  # a collector on this machine whose process is gone (a crash the broker has not noticed yet)
    again = local.edge_background("collect", "--out", str(local.root / "b"), log=local.root / "b.log")
    fleet.wait(lambda: (holder() or {}).get("pid") == again.pid, 60, "the new collector taking over at once")
    retain(b"")  # a stray will clears the registration of the live collector: it registers again
    fleet.wait(lambda: (holder() or {}).get("pid") == again.pid and seen[-2:-1] == [b""], 30,
               "the live collector registering again")
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=30) == 0, (local.root / "b.log").read_text()
    fleet.wait(lambda: holder() is None, 30, "a clean exit clearing the registration")
    retain(claim(host="elsewhere.example", pid=4))  # on another machine: refused until it lapses
    remote = local.edge("collect", "--out", str(local.root / "b"), "--seconds", "1")
    assert_one_line_error(remote, "on elsewhere.example", "loses its claim within")
    retain(b"")
    later = local.edge("collect", "--out", str(local.root / "b"), "--seconds", "1")
    assert later.returncode == 0, later.stdout + later.stderr


@pytest.mark.slow
def test_chunk_requests_from_a_device_that_is_not_a_target_go_unanswered(edge_fleet):
    fleet = edge_fleet("dev0")
    model = fleet.models[1]
    watcher = fleet.local.observer(["reled/v1/models/#"])
    chunks_seen: list[str] = []
    log = fleet.local.root / "deploy.log"
    deploy = fleet.local.edge_background("deploy", "--device", "dev0", "--model", str(model.path), "--chunk-size",
                                         "1024", "--timeout", "120", log=log)
    attacker = device_link(fleet, "dev1")
    total = -(-len(model.data) // 1024)
    try:
        while deploy.poll() is None:
            attacker.publish(device_topic("dev1", "req/chunk"), encode({"sha256": model.sha256,
                                                                        "chunks": list(range(64))}))
            watcher.pump(0.05, on_message=lambda m: chunks_seen.append(m.topic) if "/models/" in m.topic else None)
    finally:
        attacker.close()
    assert deploy.returncode == 0, log.read_text()
    text = log.read_text()
    assert "1/1 committed" in text and "chunk requests refused" in text, text
    assert len(chunks_seen) < 3 * total, (len(chunks_seen), total)  # dev0's download and its re-requests only


# -- fuzzing ----------------------------------------------------------------------------------------
FUZZ_SECONDS = 25
SERVER_LEAVES = ("reported", "status", "events", "req/chunk", "rollouts", "desired", "rollouts/ack")
def mutated(rng: random.Random, document: dict[str, Any], wide: bool) -> dict[str, Any]:
    """A valid document with one field replaced or added."""
    return {**document, rng.choice([*document, *FUZZ_NAMES]): random_value(rng, rng.randrange(4), wide)}


def fuzz_payload(rng: random.Random, leaf: str, template: dict[str, Any], sha256: str) -> bytes:
    pick = rng.randrange(8)
    if pick == 0:
        return rng.randbytes(rng.choice([0, 1, 100, 10_000, 200_000]))
    if pick == 1:
        return rng.choice([DEEP, HUGE_INT_STATUS, WRONG_SHAPE, b'{"online": NaN}', b'{"ts": 1e999}'])
    if pick == 2:
        return json.dumps(random_value(rng, rng.randrange(12), wide=True)).encode()
    if pick == 3:
        return msgpack.packb(random_value(rng, rng.randrange(12), wide=False))
    if leaf == "rollouts":
        batch = Batch("dev2", rng.randrange(2**63), rng.randrange(2**20), columns(rng.randrange(1, 50)))
        if pick == 4:
            return pack(batch)
        document = mutated(rng, msgpack.unpackb(zstandard.ZstdDecompressor().decompress(pack(batch))), wide=False)
        return zstandard.ZstdCompressor().compress(msgpack.packb(document, use_bin_type=True))
    if leaf == "req/chunk":
        return encode({"sha256": sha256, "chunks": [rng.randrange(-5, 100) for _ in range(rng.randrange(70))]})
    return json.dumps(mutated(rng, template, wide=True)).encode()


@pytest.mark.slow
def test_fuzzing_every_topic_the_server_reads_stops_no_tool(edge_fleet):
    fleet = edge_fleet("dev0")
    local = fleet.local
    out = local.root / "rollouts"
    collector = local.edge_background("collect", "--out", str(out), log=local.root / "collect.log")
    local.start_daemon("dev3")
    fleet.wait(lambda: "dev3" in fleet.link.reported, 60, "dev3 reporting")
    template = fleet.reported("dev0")
    deploy = local.edge_background("deploy", "--device", "dev0", "--model", str(fleet.models[1].path),
                                   "--chunk-size", "1024", "--timeout", "120", log=local.root / "deploy.log")
    fuzzer = device_link(fleet, "dev2")
    rng = random.Random(14)
    statuses: list[tuple[subprocess.Popen, Path]] = []
    published = 0
    end = time.monotonic() + FUZZ_SECONDS
    try:
        while time.monotonic() < end:
            leaf = rng.choice(SERVER_LEAVES)
            info = fuzzer.publish(device_topic("dev2", leaf), fuzz_payload(rng, leaf, template, fleet.models[1].sha256),
                                  retain=rng.random() < 0.3)
            published += 1
            if published % 20 == 0:
                info.wait_for_publish(10)  # keep pace with the broker
            if not statuses or statuses[-1][0].poll() is not None:
                log = local.root / f"status-{len(statuses)}.log"
                statuses.append((local.edge_background("status", log=log), log))
            assert collector.poll() is None, (local.root / "collect.log").read_text()
    finally:
        fuzzer.close()
    assert deploy.wait(timeout=150) == 0, (local.root / "deploy.log").read_text()
    assert len(statuses) >= 3 and published >= 500, (len(statuses), published)
    for status, log in statuses:
        output = log.read_text() if status.wait(timeout=60) is not None else ""
        assert status.returncode == 0 and "Traceback" not in output, output
        assert row(output, "dev0") and row(output, "dev3"), output

    def drained() -> bool:
        rep = fleet.reported("dev3")
        return rep.get("decisions") == 10_000 and rep.get("outbox_rows") == 0
    fleet.wait(drained, 180, "dev3's 10,000 decisions acknowledged")
    collector.send_signal(signal.SIGTERM)
    assert collector.wait(timeout=30) == 0, (local.root / "collect.log").read_text()
    rows = read_rollouts(out, "dev3")
    assert np.array_equal(np.sort(rows["decision"]), np.arange(1, 10_001))  # every decision, once
    read_rollouts(out)  # whatever dev2 got written, the whole store still reads
    for device in ("dev0", "dev3"):
        assert local.daemons[device].poll() is None, f"{device}'s daemon exited"
