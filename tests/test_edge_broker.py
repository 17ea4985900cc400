"""The generated Mosquitto on its own terms: listeners, ACL, TLS names, privileges, secrets, stop, device-file checks.

Real Mosquitto and real processes on free 127.0.0.1 ports (fixtures in conftest.py stop them, also on failure).
Each test fails on the broker setup it guards against: a shared listener, a device ACL of read-write on the whole
subtree, a certificate for one name only, a broker left running as root, secrets chmod-ed after writing, a
``broker stop`` that signals any recorded pid, a ``--check`` that reads no file, a relative CA path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import socket
import stat
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from edge_runtime.errors import RELEDError
from edge_runtime.fleet import broker
from edge_runtime.fleet.local import EDGE, LocalFleet, free_port, wait_for
from edge_runtime.fleet.server import server_address
from edge_runtime.keys import KeyFolder
from edge_runtime.mqtt import BrokerAddress, Link, Message
from edge_runtime.protocol import SERVER_USER, device_topic


def device_link(fleet: LocalFleet, device: str, client_id: str, subscriptions: list[str] = ()) -> Link:
    """A connection with ``device``'s credentials on the devices' plain listener (not started)."""
    password = KeyFolder(fleet.keys).password(device)
    return Link(BrokerAddress("127.0.0.1", fleet.port, device, password), client_id, list(subscriptions))


def next_message(link: Link) -> Message | None:
    with contextlib.suppress(queue.Empty):
        return link.inbox.get_nowait()
    return None


def retained(fleet: LocalFleet, topic: str) -> bytes:
    """What the broker keeps retained on ``topic``, as a fresh server connection reads it."""
    address = server_address(KeyFolder(fleet.keys), fleet.broker_dir, None, None)
    reader = Link(address, "reader", [topic]).start()
    try:
        return wait_for(lambda: next_message(reader), 10, f"the retained message on {topic}").payload
    finally:
        reader.close()


def words(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


FAST = {"runtime": {"decision_seconds": 1.0, "speed": 20.0}}  # a decision every 50 ms, reports every second


@pytest.fixture
def fleet(local_fleet: LocalFleet) -> LocalFleet:
    """Device files for dev0 and dev1 (no policy: fixed-time), their keys and a broker; no daemon yet."""
    for k, device in enumerate(("dev0", "dev1")):
        local_fleet.write_device(device, f"X{k}", ["GGrr", "rrGG"], replay_seed=k, **FAST)
    local_fleet.init_keys()
    local_fleet.start_broker()
    return local_fleet


@pytest.mark.slow
def test_a_device_cannot_knock_another_off_the_broker(fleet):
    fleet.start_daemon("dev0")
    server = fleet.observer()

    def wait(condition, what: str):
        return wait_for(condition, 30, what, poll=lambda: server.pump(0.05))

    def decisions() -> int:
        return server.reported.get("dev0", {}).get("decisions", 0)

    def keeps_deciding() -> None:
        target = decisions() + 3
        wait(lambda: decisions() >= target, "dev0 still deciding and reporting")

    online = wait(lambda: server.status.get("dev0", {}).get("online") and server.status["dev0"], "dev0 online")
    # dev1's credentials with the victim's client id, and with the id the broker gives it (its user name)
    for client_id in ("reled-dev0", "dev0"):
        attacker = device_link(fleet, "dev1", client_id).start()
        try:
            keeps_deciding()
            assert attacker.connected.is_set()
        finally:
            attacker.close()
    assert server.status["dev0"] == online  # never offline (its will), never reconnected (a new status)
    log = (fleet.broker_dir / "mosquitto.log").read_text()
    assert "already connected" not in log and "as dev1 " in log, log[-2000:]  # renamed, and no session taken over


def test_devices_cannot_log_in_where_the_fleet_tools_do(fleet):
    keys = KeyFolder(fleet.keys)
    with pytest.raises(RELEDError, match="Not authorized"):
        Link(BrokerAddress("127.0.0.1", fleet.server_port, "dev0", keys.password("dev0")), "dev0",
             []).start(timeout=2)
    with pytest.raises(RELEDError, match="Not authorized"):  # and the server has nothing to do on theirs
        Link(BrokerAddress("127.0.0.1", fleet.port, SERVER_USER, keys.password(SERVER_USER)), "x",
             []).start(timeout=2)
    # several fleet tools at once (deploy, collect, status) keep their sessions
    first, second = fleet.observer(), fleet.observer(["reled/v1/dev/+/hil/#"])
    heard: list[str] = []

    def ping() -> None:
        first.link.publish(device_topic("dev0", "hil/obs"), b"ping")
        second.pump(0.1, on_message=lambda m: heard.append(m.topic))

    wait_for(lambda: device_topic("dev0", "hil/obs") in heard, 10, "the second tool hearing the first", poll=ping)
    assert first.link.connected.is_set() and second.link.connected.is_set()


def test_a_device_can_neither_overwrite_nor_erase_its_signed_command(fleet):
    desired = device_topic("dev0", "desired")  # no daemon: this test is dev0
    fleet.observer().command("dev0", {"kind": "rollback"})
    signed = retained(fleet, desired)
    watcher = fleet.observer(["reled/v1/dev/dev0/#"])
    heard: list[tuple[str, bytes]] = []

    def listen() -> None:
        watcher.pump(0.05, on_message=lambda m: heard.append((m.topic, m.payload)))

    wait_for(lambda: (desired, signed) in heard, 10, "the watcher's subscription", poll=listen)
    dev = device_link(fleet, "dev0", "reled-dev0", [desired]).start()
    try:
        assert wait_for(lambda: next_message(dev), 10, "dev0 reading its command").payload == signed
        dev.publish(desired, b"", retain=True).wait_for_publish(5)  # erase
        dev.publish(desired, b"forged", retain=True).wait_for_publish(5)
        for leaf in ("rollouts/ack", "hil/obs"):
            dev.publish(device_topic("dev0", leaf), b"forged").wait_for_publish(5)
        dev.publish(device_topic("dev0", "hil/act"), b"after").wait_for_publish(5)  # one of its own leaves
        wait_for(lambda: (device_topic("dev0", "hil/act"), b"after") in heard, 10, "dev0's own message", poll=listen)
    finally:
        dev.close()
    assert [(t, p) for t, p in heard if p in (b"", b"forged")] == []
    assert retained(fleet, desired) == signed


@pytest.mark.slow
def test_tls_only_certificate_names_and_verification_errors(local_fleet, assert_one_line_error):
    fleet = local_fleet
    tls_port = free_port(fleet.port, fleet.server_port)
    keys = KeyFolder(fleet.keys)
    ca = keys.tls_dir / "ca.crt"
    fleet.write_device("tls0", "X", ["GGrr", "rrGG"], broker={"host": "localhost", "port": tls_port,
                                                              "ca_file": str(ca)})
    fleet.init_keys()
    assert_one_line_error(fleet.edge("broker", "start", "--keys", str(fleet.keys), "--dir", str(fleet.broker_dir),
                                     "--tls-only"), "--tls-only needs --tls-port")
    fleet.start_broker(tls_port, "--tls-only", "--host", "localhost")  # the certificate names localhost only
    config = (fleet.broker_dir / "mosquitto.conf").read_text()
    assert f"listener {fleet.port} " not in config
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fleet.port), timeout=5).close()
    fleet.start_daemon("tls0")
    observer = fleet.observer()
    assert observer.link.address.ca_file == str(ca.resolve())

    def decisions() -> int:
        return observer.reported.get("tls0", {}).get("decisions", 0)

    wait_for(lambda: decisions() > 0, 30, "tls0 reporting over TLS", poll=lambda: observer.pump(0.05))
    server = BrokerAddress("127.0.0.1", fleet.server_port, SERVER_USER, keys.password(SERVER_USER), str(ca))
    with pytest.raises(RELEDError, match=r"TLS verification failed: .*not valid for '127\.0\.0\.1'"):
        Link(server, "by-address", []).start(timeout=3)
    ca_pem, cert_pem = ca.read_bytes(), (keys.tls_dir / "server.crt").read_bytes()
    fleet.stop_broker()
    fleet.start_broker(tls_port, "--tls-only", "--host", "localhost", "--tls-name", "127.0.0.1")
    assert ca.read_bytes() == ca_pem and (keys.tls_dir / "server.crt").read_bytes() != cert_pem  # same CA, new names
    Link(server, "by-address", []).start(timeout=10).close()
    before = decisions()
    wait_for(lambda: decisions() > before, 30, "tls0 back over TLS with the reissued certificate",
             poll=lambda: observer.pump(0.05))


def test_a_changed_name_reissues_the_server_certificate_from_the_same_ca(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = KeyFolder(tmp_path / "keys")
    ca = keys.ensure_tls(["broker.example", "127.0.0.1"])
    first = (keys.tls_dir / "server.crt").read_bytes()
    assert keys.ensure_tls(["broker.example", "127.0.0.1"]) == ca
    assert (keys.tls_dir / "server.crt").read_bytes() == first  # same names: kept
    keys.ensure_tls(["mqtt.example.org", "127.0.0.1"])
    cert = x509.load_pem_x509_certificate((keys.tls_dir / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mqtt.example.org"]
    authority = x509.load_pem_x509_certificate(ca.read_bytes())
    authority.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


@pytest.mark.skipif(os.geteuid() != 0, reason="Mosquitto drops to its own user only when started as root: run the "
                                              "tests as root to check it")
def test_started_as_root_the_broker_runs_as_mosquitto(local_fleet):
    fleet = local_fleet
    fleet.write_device("dev0", "X", ["GGrr", "rrGG"])
    fleet.init_keys()
    fleet.start_broker(free_port(fleet.port, fleet.server_port))
    user = pwd.getpwnam("mosquitto")
    status = Path(f"/proc/{fleet.broker_pid()}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == [str(user.pw_uid)] * 4, status
    link = fleet.observer()  # it reads its password files, ACLs and TLS key as that user
    link.link.publish(device_topic("dev0", "desired"), b"kept", retain=True).wait_for_publish(5)
    fleet.stop_broker()  # SIGTERM: it saves its persistence file as that user
    folder = fleet.broker_dir
    assert folder.stat().st_uid == user.pw_uid and stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        if path.name != broker.STATE_FILE:
            assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (user.pw_uid, 0o600), path
    assert (folder / "mosquitto.db").exists()
    keys = KeyFolder(fleet.keys)
    for secret in (keys.signing_key_path, keys.secret_path("dev0"), keys.tls_dir / "server.key"):
        assert (secret.stat().st_uid, stat.S_IMODE(secret.stat().st_mode)) == (os.geteuid(), 0o600), secret
    fleet.start_broker(free_port(fleet.port, fleet.server_port))
    assert retained(fleet, device_topic("dev0", "desired")) == b"kept"


def test_secrets_are_0600_from_their_first_byte(tmp_path, monkeypatch):
    modes: dict[str, set[int]] = {}
    write_bytes = Path.write_bytes

    def observed(self: Path, data: bytes) -> int:  # atomic_path made the file: its mode is what others could see
        final = self.name[1:].rsplit(".", 2)[0] if self.name.endswith(".tmp") else self.name
        modes.setdefault(final, set()).add(stat.S_IMODE(self.stat().st_mode))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", observed)
    keys = KeyFolder(tmp_path / "keys")
    keys.init(["dev0"])
    folder = tmp_path / "broker"
    port = free_port()
    tls_port = free_port(port)
    try:
        broker.start(folder, keys, port=port, tls_port=tls_port, server_port=free_port(port, tls_port))
    finally:
        broker.stop(folder)
    secrets = {"signing.key", "reled-server.secret", "dev0.secret", "ca.key", "server.key", "passwd-devices",
               "passwd-server"}
    assert secrets <= set(modes), modes
    assert {name: modes[name] for name in secrets} == {name: {0o600} for name in secrets}
    for path in [*(keys.root.rglob("*")), *folder.iterdir()]:
        if path.name in secrets:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert keys.password("dev0") not in (folder / "passwd-devices").read_text()  # hashed, never written plain


def test_broker_stop_signals_only_its_own_mosquitto(local_fleet, spawn, tmp_path, wait_until):
    fleet = local_fleet
    fleet.init_keys()
    fleet.start_broker()
    ours = fleet.broker_pid()
    sleeper = spawn(["sleep", "300"])
    for name, pid in (("reused-by-sleep", sleeper.pid), ("reused-by-another-broker", ours)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / broker.STATE_FILE).write_text(json.dumps(asdict(broker.BrokerInfo("127.0.0.1", 1, 2, pid=pid))))
        proc = fleet.edge("broker", "stop", "--dir", str(folder))
        assert proc.returncode == 0 and f"pid {pid} is now" in words(proc.stdout) and "left alone" in proc.stdout, \
            proc.stdout + proc.stderr
        assert not (folder / broker.STATE_FILE).exists()
    assert sleeper.poll() is None and broker.running_pid(fleet.broker_dir) == ours
    proc = fleet.edge("broker", "stop", "--dir", str(fleet.broker_dir))
    assert proc.returncode == 0 and f"stopped mosquitto (pid {ours})" in proc.stdout, proc.stdout + proc.stderr
    wait_until(lambda: broker.running_pid(fleet.broker_dir) is None, 10, "the broker gone")


def test_check_names_every_missing_file(local_fleet, tmp_path):
    fleet = local_fleet
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = fleet.write_device("dev0", "X", ["GGrr", "rrGG"], broker={"ca_file": str(tmp_path / "ca.crt")},
                                sensor={"file": str(tmp_path / "none.npz")},
                                actuator={"file": str(blocker / "logs" / "signal.log")})
    state_dir = json.dumps(str(fleet.root / "state" / "dev0"))
    config.write_text(config.read_text().replace(state_dir, json.dumps(str(blocker / "state"))))
    proc = subprocess.run([*EDGE, "daemon", "--config", str(config), "--check"], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error:") and "6 of the files" in lines[-1], proc.stderr
    for needle in ("[broker] password_file", "[security] public_key", "[broker] ca_file", "none.npz does not exist",
                   "[device] state_dir", "[actuator] file's folder"):
        assert sum(needle in line for line in lines[:-1]) == 1, (needle, proc.stderr)
    # what `fleet up` writes (LocalFleet) works on this machine as it is
    fleet.write_device("dev0", "X", ["GGrr", "rrGG"])
    fleet.init_keys()
    proc = subprocess.run([*EDGE, "daemon", "--config", str(config), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_status_works_from_another_directory(local_fleet, tmp_path):
    fleet = local_fleet
    fleet.init_keys()
    tls_port = free_port(fleet.port, fleet.server_port)
    start = [*EDGE, "broker", "start", "--keys", "keys", "--dir", "broker", "--port", str(fleet.port),
             "--tls-port", str(tls_port), "--server-port", str(fleet.server_port)]
    proc = subprocess.run(start, cwd=fleet.root, capture_output=True, text=True)  # relative paths, as typed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([*EDGE, "status", "--keys", str(fleet.keys), "--broker-dir", str(fleet.broker_dir)],
                          cwd=elsewhere, capture_output=True, text=True)
    assert proc.returncode == 0 and "fleet" in proc.stdout, proc.stdout + proc.stderr
    assert Path(broker.BrokerInfo.read(fleet.broker_dir).ca_file).is_absolute()


def test_the_server_acl_example_matches_the_template():
    example = Path(__file__).resolve().parents[1] / "firmware_configs" / "mosquitto" / "acl-server.example"
    assert example.read_text() == broker.server_acl_text()  # tools/render_mosquitto_example.py writes it
