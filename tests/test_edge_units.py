"""Edge runtime pieces on their own: signed documents, manifests, outbox, rollout batches, configs, keys."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.device.device_config import load_device_config
from edge_runtime.device.outbox import Outbox
from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.fleet.broker import acl_text
from edge_runtime.fleet.deploy import DONE, FAILED, PENDING, Target, judge
from edge_runtime.keys import KeyFolder
from edge_runtime.protocol import Manifest, ProtocolError, decode_json, sign, verify
from edge_runtime.rollouts import Batch, pack, unpack

ROOT = Path(__file__).resolve().parents[1]


def test_signed_documents_verify_and_any_change_breaks_them(tmp_path):
    """The server signs with `cryptography`, the controller pins signing.pub and verifies with libsodium."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from edge_runtime.credentials import load_public_key

    server, stranger = KeyFolder(tmp_path / "server"), KeyFolder(tmp_path / "stranger")
    server.init([])
    stranger.init([])
    key, pinned = server.signing_key(), load_public_key(server.public_key_path)
    payload = sign({"kind": "deploy", "seq": 3, "device": "a"}, key)
    assert verify(payload, pinned)["seq"] == 3
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(payload.replace(b'"seq":3', b'"seq":4'), pinned)
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(payload, load_public_key(stranger.public_key_path))
    with pytest.raises(ProtocolError, match="bad signature"):
        verify(payload.replace(b'"sig":"', b'"sig":"!'), pinned)
    with pytest.raises(ProtocolError, match="unsigned"):
        verify(b'{"doc": {"seq": 1}}', pinned)
    with pytest.raises(ProtocolError, match="malformed JSON"):
        decode_json(b"{nope")
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_json(b" " * 300_000)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(ec_pem)
    with pytest.raises(RELEDError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "ec.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(RELEDError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pub")


def test_manifests_are_checked_for_consistency():
    good = {"sha256": "a" * 64, "size": 100, "chunk_size": 64, "chunks": ["b" * 64, "c" * 64], "schema_version": 1,
            "intersection": "X", "phase_table": ["Gr", "rG"], "policy_version": 2, "precision": "fp32",
            "expires": 1e12}
    assert Manifest.from_dict(good).to_dict() == good
    with pytest.raises(ProtocolError, match="lists 1 chunks"):
        Manifest.from_dict(dict(good, chunks=["b" * 64]))
    with pytest.raises(ProtocolError, match="chunk_size: integer outside"):
        Manifest.from_dict(dict(good, chunk_size=1 << 20))
    with pytest.raises(ProtocolError, match="lacks or garbles"):
        Manifest.from_dict({k: v for k, v in good.items() if k != "sha256"})


def rows(outbox: Outbox, n: int) -> None:
    for i in range(n):
        outbox.add(float(i), np.full(feature_size(), i, np.float32), np.ones(MAX_PHASES, bool), i % 2, -0.5, False,
                   -float(i), 0, 7)


def test_outbox_batches_resends_identically_and_deletes_only_on_ack(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite", "dev", batch_rows=4, flush_seconds=3600, resend_seconds=3600)
    rows(outbox, 10)
    assert outbox.seal() == 2  # two full batches; 2 rows wait for more or for flush_seconds
    first = outbox.due()
    assert [seq for seq, _ in first] == [1, 2] and outbox.due() == []  # not resent before resend_seconds
    outbox.resend_all()
    assert outbox.due() == first  # byte-identical resend: the collector can drop the copy
    batch = unpack(first[0][1])
    assert batch.epoch == outbox.epoch and batch.rows == 4
    assert np.array_equal(batch.columns["decision"], [1, 2, 3, 4]) and batch.columns["obs"].shape == (4, feature_size())
    assert not outbox.ack(outbox.epoch + 1, 1)  # another epoch's ack changes nothing
    assert outbox.ack(outbox.epoch, 1) and outbox.pending_rows() == 6
    assert outbox.seal(force=True) == 1
    epoch = outbox.epoch
    outbox.close()
    reopened = Outbox(tmp_path / "o.sqlite", "dev")
    assert reopened.epoch == epoch and reopened.recorded() == 10  # ids keep growing after a restart
    rows(reopened, 1)
    assert reopened.recorded() == 11


def test_outbox_cap_drops_the_oldest_rows(tmp_path):
    outbox = Outbox(tmp_path / "o.sqlite", "dev", max_rows=5)
    rows(outbox, 8)
    assert outbox.enforce_cap() == 3 and outbox.pending_rows() == 5
    sealed = Outbox(tmp_path / "s.sqlite", "dev", batch_rows=4, max_rows=5)
    rows(sealed, 8)
    sealed.seal()  # offline: everything sits in unacknowledged batches
    assert sealed.enforce_cap() == 4 and sealed.pending_rows() == 4  # the oldest batch goes
    assert [seq for seq, _ in sealed.due()] == [2]


def test_rollout_batches_refuse_garbage():
    columns = {"decision": np.arange(3), "time": np.zeros(3), "obs": np.zeros((3, feature_size())),
               "mask": np.ones((3, MAX_PHASES), bool), "action": np.zeros(3), "log_prob": np.zeros(3),
               "override": np.zeros(3, bool), "reward": np.zeros(3), "source": np.zeros(3),
               "policy_version": np.zeros(3)}
    back = unpack(pack(Batch("d", 1, 2, columns)))
    assert (back.device, back.epoch, back.seq, back.rows) == ("d", 1, 2, 3)
    for junk in (b"", b"\x28\xb5\x2f\xfd garbage", b"x" * (2 << 20)):
        with pytest.raises(ProtocolError):
            unpack(junk)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


DEVICE = '[device]\nid = "d1"\nintersection = "X"\nstate_dir = "s"\n[signal]\ngreen_phases = ["Gr", "rG"]\n'


def test_device_files_merge_the_profile_and_refuse_mistakes(tmp_path):
    write(tmp_path / "profiles" / "pi.toml", "[inference]\nthreads = 2\nlatency_budget_ms = 4.0\n"
                                             "[signal]\nyellow = 4.0\n")
    cfg = load_device_config(write(tmp_path / "devices" / "d1.toml",
                                   DEVICE.replace('state_dir = "s"', 'state_dir = "s"\nprofile = "pi"')
                                   + "[inference]\nthreads = 1\n"))
    assert cfg.inference.threads == 1 and cfg.inference.latency_budget_ms == 4.0 and cfg.signal.yellow == 4.0
    assert cfg.device.state_dir == (tmp_path / "devices" / "s").resolve()
    cases = {
        DEVICE + "[signal]\n": "not valid TOML",
        DEVICE + "[runtime]\nspeeed = 2.0\n": "unknown key(s) ['speeed'] in [runtime]",
        DEVICE + "[radio]\nx = 1\n": "unknown section(s) ['radio']",
        DEVICE.replace('id = "d1"', 'id = "a b"'): "device id 'a b'",
        DEVICE.replace('["Gr", "rG"]', '["Gr"]'): "at least 2 phases",
        DEVICE.replace('state_dir = "s"', 'state_dir = "s"\nprofile = "nope"'): "profile 'nope' not found",
        DEVICE + "[runtime]\nmax_decisions = 1.5\n": "max_decisions = 1.5",
        DEVICE.replace('intersection = "X"\n', ""): "missing 'intersection'",
        DEVICE + "[probation]\ndecisions = 5\nmax_failures = 5\n": "max_failures = 5 must be below decisions = 5",
    }
    for text, needle in cases.items():
        with pytest.raises(RELEDError, match=None) as info:
            load_device_config(write(tmp_path / "devices" / "bad.toml", text))
        assert needle in str(info.value), (needle, str(info.value))


def test_shipped_device_files_and_profiles_load():
    for path in sorted((ROOT / "firmware_configs" / "devices").glob("*.toml")):
        cfg = load_device_config(path)
        assert cfg.inference.threads == 1 and len(cfg.signal.green_phases) >= 2


def test_mosquitto_examples_match_the_template():
    tool = runpy.run_path(str(ROOT / "tools" / "render_mosquitto_example.py"))  # its functions, not its __main__
    example_dir = tool["EXAMPLE_DIR"]
    assert (example_dir / "mosquitto.conf.example").read_text() == tool["example_config"]()
    assert (example_dir / "acl.example").read_text() == acl_text()


def test_keys_init_is_safe_to_repeat(tmp_path):
    keys = KeyFolder(tmp_path / "k")
    created, users = keys.init(["a", "b"])
    assert created and users == ["reled-server", "a", "b"]
    signing = keys.signing_key_path.read_bytes()
    created, users = keys.init(["a", "c"])
    assert not created and users == ["c"] and keys.signing_key_path.read_bytes() == signing
    assert (keys.secret_path("a").stat().st_mode & 0o777) == 0o600
    with pytest.raises(RELEDError, match="server's own MQTT user"):
        keys.init(["reled-server"])


def test_deploy_judges_device_reports():
    from edge_runtime.fleet.server import Model

    model = Model(Path("m.onnx"), b"", "s" * 64, 5, "fp32", {})
    target = Target("d", "X", seq=10)
    judge(target, model, {"state": "DOWNLOADING", "job": {"sha256": "s" * 64, "chunks_have": 2, "chunks_total": 4},
                          "desired_seq": 10})
    assert target.outcome == PENDING and "2/4" in target.progress
    judge(target, model, {"state": "ROLLED_BACK", "error": "probation failed: x", "error_seq": 10, "desired_seq": 10})
    assert target.outcome == FAILED and "probation" in target.detail
    done = Target("d", "X", seq=10)
    judge(done, model, {"state": "COMMITTED", "active": {"sha256": "s" * 64}, "desired_seq": 10})
    assert done.outcome == DONE


def test_edge_cli_errors_are_one_line(tmp_path):
    edge = [sys.executable, "-m", "edge_runtime"]
    proc = subprocess.run([*edge, "daemon", "--config", str(tmp_path / "missing.toml")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    proc = subprocess.run([*edge, "deploy", "--model", "x.onnx", "--devices", str(tmp_path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "name the targets" in proc.stderr
    proc = subprocess.run([*edge, "status", "--broker-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "broker start" in proc.stderr


def test_edge_runtime_never_imports_torch_or_sumo():
    code = ("import sys, edge_runtime.cli, edge_runtime.device.daemon, edge_runtime.fleet.deploy, "
            "edge_runtime.fleet.collector, edge_runtime.fleet.local; "
            "bad = [m for m in ('torch', 'traci', 'libsumo', 'sumolib', 'trainer') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_running_daemon_carries_no_command_line_or_server_libraries():
    """What `reled-edge daemon` becomes (edge_runtime.device.__main__) imports neither the CLI's libraries nor
    `cryptography`: the controller's resident memory (tools/bench/edge_soak.py)."""
    code = ("import sys, edge_runtime.device.__main__, edge_runtime.device.daemon; "
            "bad = [m for m in ('typer', 'rich', 'pydantic', 'cryptography', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hostile_json_is_refused_without_recursion_or_stray_errors():
    for payload, needle in ((b"[" * 100_000 + b"]" * 100_000, "arrays and objects"),
                            (b'{"a":' + b"[" * 20 + b"]" * 20 + b"}", "nested deeper"),
                            (b'{"seq":' + b"9" * 5000 + b"}", "malformed JSON"),
                            (b'{"ts": NaN}', "malformed JSON"), (b"\xff\xfe{}", "malformed JSON"),
                            (b"[1, 2]", "expected a JSON object")):
        with pytest.raises(ProtocolError, match=needle):
            decode_json(payload)
    assert decode_json(b'{"a": [[1, {"b": 2}]]}') == {"a": [[1, {"b": 2}]]}


def test_manifest_fields_that_name_files_must_be_hashes():
    good = Manifest("a" * 64, 10, 1024, ("b" * 64,), 1, "X", ("Gr", "rG"), 2, "fp32", 1e12).to_dict()
    for field, value in (("sha256", "../../etc/passwd"), ("chunks", ["B" * 64]), ("size", -1), ("size", True),
                         ("policy_version", "3"), ("expires", float("inf")), ("phase_table", "Gr")):
        with pytest.raises(ProtocolError, match="manifest"):
            Manifest.from_dict(dict(good, **{field: value}))


def test_a_policy_whose_metadata_is_not_utf8_is_refused(tmp_path, queue_policy):
    from edge_runtime.policy import OnnxPolicy

    path = queue_policy(tmp_path / "p.onnx", version=1, tables={"X": ["Gr", "rG"]}, scenario="Z" * 8,
                        test_queue=np.ones((2, MAX_PHASES), np.float32), n_phases=2)
    path.write_bytes(path.read_bytes().replace(b"Z" * 8, b"\xff" * 8))
    with pytest.raises(RELEDError, match="not UTF-8"):
        OnnxPolicy(path)


def test_the_startup_clearance_shows_yellow_then_red_on_every_movement_before_the_first_green():
    from edge_runtime.shield import SafetyShield, Stage, clearance_state

    greens = ("GGrrs", "rrGgs")
    shield = SafetyShield(2, clear_first=True)
    assert shield.clearing and shield.state.stage is Stage.YELLOW
    assert clearance_state(greens, Stage.YELLOW) == "yyyys" and clearance_state(greens, Stage.ALL_RED) == "rrrrs"
    assert shield.propose(1, 0.0) == []  # a proposal cannot cut the clearance short
    entered = shield.advance(10.0)
    assert [(s.stage, s.phase, s.since) for s in entered] == [(Stage.ALL_RED, 0, 3.0), (Stage.GREEN, 0, 5.0)]
    assert not shield.clearing


def test_the_outbox_keeps_its_write_ahead_log_small(tmp_path):
    """A controller's state partition is small: the WAL is checkpointed and truncated as rows go by, not left at
    SQLite's 4 MiB."""
    outbox = Outbox(tmp_path / "o.sqlite", "dev", batch_rows=64, flush_seconds=3600)
    wal = tmp_path / "o.sqlite-wal"
    largest = 0
    for i in range(4000):
        outbox.add(float(i), np.zeros(feature_size(), np.float32), np.ones(MAX_PHASES, bool), 0, 0.0, False, 0.0,
                   0, 1)
        outbox.seal()
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    assert 0 < largest < 1_500_000, largest
    assert outbox.recorded() == 4000 and outbox.pending_rows() == 4000


def test_a_manifest_too_long_for_a_signed_command_is_refused_at_the_server():
    from edge_runtime.fleet.server import MAX_CHUNKS, Model

    model = Model(Path("big.onnx"), b"x" * (MAX_CHUNKS * 1024 + 1), "a" * 64, 1, "fp32", {"X": ["Gr", "rG"]})
    with pytest.raises(RELEDError, match="use a larger --chunk-size"):
        model.manifest("X", 1024, 60)
    assert len(model.manifest("X", 65536, 60).chunks) == 47
