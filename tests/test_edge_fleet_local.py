"""`reled-edge fleet up` / `fleet down`: a detached fleet of real controllers on this machine, optionally each in a
network namespace behind netem.

Real Mosquitto, real daemons, the real collector, driven through the CLI as a user would. The ``fleet_dir``
fixture runs `fleet down` at teardown, passed or failed, and then stops whatever the folder's fleet.json still
names (only processes whose command line names the folder) and removes its namespaces, so no test leaves a
process or a namespace behind. Waits have deadlines; nothing sleeps and hopes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edge_runtime.device.device_config import load_device_config
from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_size
from edge_runtime.fleet import broker, netns
from edge_runtime.fleet.local import (
    EDGE,
    FLEET_FILE,
    LocalFleet,
    fleet_processes,
    stop_processes,
    write_fleet_devices,
)
from edge_runtime.policy import META_PREFIX, OnnxPolicy, PolicyMetadata, PolicyTiming, SelfTest

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2")


def edge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=timeout)


def record(folder: Path) -> dict:
    return json.loads((folder / FLEET_FILE).read_text())


def gone(pid: int) -> bool:
    """No such process (a zombie waiting for its parent counts as gone: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def our_namespaces(folder: Path) -> list[str]:
    tag = netns.fleet_tag(folder)
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"reled-{tag}-")]


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Iterator[Path]:
    """A fleet folder that is always brought down at teardown (then checked for stragglers, which are stopped)."""
    folder = (tmp_path / "fleet").resolve()
    try:
        yield folder
    finally:
        edge("fleet", "down", "--dir", str(folder), timeout=120)
        if (folder / FLEET_FILE).exists():
            data = record(folder)
            stop_processes(fleet_processes(data, folder), timeout=5)
            for entry in data.get("devices", {}).values():
                if entry.get("netns"):
                    netns.delete(entry["netns"])
        if broker.running_pid(folder / "broker") is not None:
            broker.stop(folder / "broker")


@pytest.fixture(scope="session")
def model(fleet_models) -> Path:
    """A fresh grid2x2 actor, exported by `reled export` (conftest's ``fleet_models``)."""
    return fleet_models[1].path


def up(model: Path, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return edge("fleet", "up", "--model", str(model), "--dir", str(folder), *extra)


def status(folder: Path) -> str:
    proc = edge("status", "--keys", str(folder / "keys"), "--broker-dir", str(folder / "broker"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def assert_all_stopped(folder: Path, data: dict) -> None:
    pids = [e["pid"] for e in data["devices"].values()] + [data["broker_pid"]]
    if data["collector"] is not None:
        pids.append(data["collector"]["pid"])
    assert all(gone(pid) for pid in pids), [p for p in pids if not gone(p)]
    assert broker.running_pid(folder / "broker") is None
    if shutil.which("ip"):
        assert our_namespaces(folder) == []


@pytest.mark.slow
def test_fleet_up_replay_runs_detached_until_fleet_down(model, fleet_dir, wait_until):
    meta = OnnxPolicy(model).meta
    proc = up(model, fleet_dir, "--replay")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = record(fleet_dir)
    lights = list(meta.phase_tables)
    assert data["format"] == "reled-fleet/1" and data["state"] == "running"
    assert (data["model"], data["scenario"], data["hil"], data["netem"]) == (str(model), "grid2x2", False, None)
    assert {d: e["intersection"] for d, e in data["devices"].items()} == {f"dev{k}": li for k, li in enumerate(lights)}
    assert data["collector"]["out"] == "rollouts" and not gone(data["broker_pid"])
    for device, entry in data["devices"].items():  # `fleet up` has exited; its daemons run on
        assert entry["netns"] is None and entry["config"] == f"devices/{device}.toml"
        assert any(str(fleet_dir / entry["config"]) in arg for arg in psutil.Process(entry["pid"]).cmdline())
        assert f"{device}" in proc.stdout and str(entry["pid"]) in proc.stdout
    assert proc.stdout.count("COMMITTED") == len(lights)
    assert status(fleet_dir).count("COMMITTED") == len(lights)

    cfg = load_device_config(fleet_dir / "devices" / "dev0.toml")  # timed as the model was trained
    assert meta.timing == PolicyTiming()  # grid2x2: RELED's default timing, recorded by the export
    assert (cfg.signal.yellow, cfg.signal.all_red, cfg.signal.min_green, cfg.signal.max_green,
            cfg.runtime.decision_seconds) == (3, 2, 10, 60, 10)
    assert (cfg.runtime.speed, cfg.probation.decisions, cfg.sensor.adapter) == (10, 10, "replay")
    wait_until(lambda: all(list((fleet_dir / "rollouts" / d).rglob("*.npz")) for d in data["devices"]), 60,
               "a rollout batch of every device in FLEET/rollouts")

    down = edge("fleet", "down", "--dir", str(fleet_dir))
    assert down.returncode == 0 and "stopped 4 daemons, the collector, the broker" in down.stdout, down.stdout
    assert_all_stopped(fleet_dir, data)
    assert record(fleet_dir)["state"] == "stopped"
    again = edge("fleet", "down", "--dir", str(fleet_dir))
    assert again.returncode == 0 and "nothing running" in again.stdout, again.stdout + again.stderr

    # safe to start again in the same folder (keys and device state are kept; the model is still committed)
    rerun = up(model, fleet_dir, "--replay", "--devices", "2", "--no-collect")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count("COMMITTED") == 2 and record(fleet_dir)["collector"] is None


def test_a_second_fleet_up_on_a_live_folder_is_refused(model, fleet_dir, assert_one_line_error):
    first = up(model, fleet_dir, "--replay", "--devices", "1", "--no-deploy", "--no-collect")
    assert first.returncode == 0, first.stdout + first.stderr
    data = record(fleet_dir)
    second = up(model, fleet_dir, "--replay", "--devices", "1", "--no-deploy")
    assert_one_line_error(second, "already running", f"reled-edge fleet down --dir {fleet_dir}")
    assert record(fleet_dir) == data and not gone(data["devices"]["dev0"]["pid"])  # the first fleet untouched


def test_fleet_up_hil_stages_the_model_for_the_simulation(model, fleet_dir):
    """--hil (the default): the devices wait for `reled hil run`, so the deploy ends with the model staged."""
    pytest.importorskip("edge_runtime.device.hil", reason="the daemon's HIL adapter has not landed")
    proc = up(model, fleet_dir, "--devices", "2", "--no-collect")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = record(fleet_dir)
    assert data["hil"] is True and data.get("deploy") is None  # the deploy process is not left running
    assert load_device_config(fleet_dir / "devices" / "dev0.toml").hil
    assert "staged on every controller" in proc.stdout and proc.stdout.count("STAGED") == 2, proc.stdout


def test_bad_requests_are_refused_before_anything_starts(model, tmp_path, assert_one_line_error):
    folder = tmp_path / "fleet"
    assert_one_line_error(up(model, folder, "--replay", "--scenario", "cologne8"), "grid2x2", "cologne8")
    assert_one_line_error(up(model, folder, "--devices", "5"), "--devices 5", "4 lights")
    assert_one_line_error(edge("fleet", "up", "--dir", str(folder)), "--model")
    assert_one_line_error(up(tmp_path / "missing.onnx", folder), "does not exist")
    assert not folder.exists()
    old = edge("fleet", "up", "--policy", str(model), "--dir", str(folder), "--scenario", "cologne8")
    assert_one_line_error(old, "cologne8")  # --policy: the old name of --model, still understood


def test_a_failure_half_way_stops_everything_it_started(model, fleet_dir, assert_one_line_error):
    (fleet_dir / "state").mkdir(parents=True)
    (fleet_dir / "state" / "dev1").write_text("a file where dev1's state folder must go")
    extra = ["--netns"] if ROOT and shutil.which("ip") else []
    proc = up(model, fleet_dir, "--replay", *extra)
    assert_one_line_error(proc, "daemon dev1 exited")
    data = record(fleet_dir)
    assert data["state"] == "stopped" and data["broker_pid"] and data["collector"]
    assert_all_stopped(fleet_dir, data)


def test_foreground_stays_until_sigterm_then_stops_the_fleet(model, fleet_dir, spawn, wait_until):
    proc = spawn([*EDGE, "fleet", "up", "--model", str(model), "--dir", str(fleet_dir), "--replay", "--devices", "1",
                  "--no-deploy", "--no-collect", "--foreground"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True)
    wait_until(lambda: (fleet_dir / FLEET_FILE).exists() and record(fleet_dir)["state"] == "running", 60,
               "the fleet running", interval=0.05)
    data = record(fleet_dir)
    assert proc.poll() is None and not gone(data["devices"]["dev0"]["pid"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "stopped 1 daemon, the broker" in proc.stdout.read()
    assert_all_stopped(fleet_dir, data)


@needs_root
def test_netns_puts_every_controller_behind_its_own_link(model, fleet_dir):
    proc = up(model, fleet_dir, "--replay", "--devices", "2", "--netns")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = record(fleet_dir)
    spaces = {d: e["netns"] for d, e in data["devices"].items()}
    assert sorted(spaces.values()) == sorted(our_namespaces(fleet_dir)) and len(spaces) == 2
    own = os.readlink("/proc/self/ns/net")
    host_ends = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    for entry in data["devices"].values():
        assert os.readlink(f"/proc/{entry['pid']}/ns/net") != own  # the daemon runs in its namespace
        cfg = load_device_config(fleet_dir / entry["config"])
        host, port = cfg.broker.host, cfg.broker.port
        assert ipaddress.ip_address(host) in netns.POOL and f"inet {host}/30" in host_ends  # the veth's host end
        inside = ["ip", "netns", "exec", entry["netns"], sys.executable, "-c"]
        reach = subprocess.run([*inside, f"import socket; socket.create_connection(({host!r}, {port}), 5)"],
                               capture_output=True, text=True)
        assert reach.returncode == 0, reach.stderr  # the broker listens on it
        loopback = subprocess.run([*inside, f"import socket; socket.create_connection(('127.0.0.1', {port}), 5)"],
                                  capture_output=True, text=True)
        assert "ConnectionRefused" in loopback.stderr  # the namespace's own loopback: no broker there
        assert link_rtt(fleet_dir, entry) < 0.030  # no netem: a veth pair is as fast as loopback
    assert status(fleet_dir).count("COMMITTED") == 2  # deployed through the veth pairs
    assert proc.stdout.count("reled-") >= 2
    down = edge("fleet", "down", "--dir", str(fleet_dir))
    assert down.returncode == 0 and "2 network namespaces" in down.stdout, down.stdout
    assert_all_stopped(fleet_dir, data)
    assert not [i for i in os.listdir("/sys/class/net") if i.startswith(f"rl{netns.fleet_tag(fleet_dir)}")]


def link_rtt(folder: Path, entry: dict) -> float:
    """The shortest of 5 TCP handshakes from inside a device's namespace to its broker address, in seconds."""
    cfg = load_device_config(folder / entry["config"])
    code = ("import socket, time\nbest = 9.0\nfor _ in range(5):\n    t = time.monotonic()\n"
            f"    socket.create_connection(({cfg.broker.host!r}, {cfg.broker.port}), 5).close()\n"
            "    best = min(best, time.monotonic() - t)\nprint(best)")
    proc = subprocess.run(["ip", "netns", "exec", entry["netns"], sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout)


def netem_missing() -> str | None:
    """Why --netem cannot run here (None: it can)."""
    if not ROOT or shutil.which("ip") is None or shutil.which("tc") is None:
        return "netem needs root, ip and tc"
    try:
        netns.check_available("delay 1ms")
    except RELEDError as exc:
        return str(exc)
    return None


def test_netem_delays_each_link_both_ways(model, fleet_dir, wait_until):
    if (why := netem_missing()) is not None:
        pytest.skip(why)
    proc = up(model, fleet_dir, "--replay", "--devices", "2", "--netem", "delay 30ms", "--no-deploy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = record(fleet_dir)
    assert data["netem"] == "delay 30ms"
    wait_until(lambda: status(fleet_dir).count("yes") >= 2, 60, "both devices online through their links")
    for entry in data["devices"].values():
        assert link_rtt(fleet_dir, entry) >= 0.060  # a TCP handshake crosses the link both ways: 30 ms + 30 ms
    assert edge("fleet", "down", "--dir", str(fleet_dir)).returncode == 0
    assert_all_stopped(fleet_dir, data)


@needs_root
def test_a_netem_that_cannot_run_leaves_nothing_behind(model, fleet_dir, assert_one_line_error):
    proc = up(model, fleet_dir, "--replay", "--netem", "delay banana")
    assert_one_line_error(proc, "--netem")
    assert our_namespaces(fleet_dir) == [] and broker.running_pid(fleet_dir / "broker") is None
    assert not (fleet_dir / FLEET_FILE).exists()
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith("reled-probe-")]


# -- device files and the timing in the model's metadata ----------------------------------------------
def metadata(timing: PolicyTiming) -> PolicyMetadata:
    tables = {"J1": ["GGrr", "rrGG"], "J2": ["Grr", "rGr", "rrG"]}
    return PolicyMetadata(SCHEMA_VERSION, feature_size(), MAX_PHASES, 1, "fp32", "somewhere", tables,
                          SelfTest([], [], [], [], 1e-3), timing)


@pytest.mark.parametrize("hil", [True, False])
def test_device_files_carry_the_trained_timing_and_the_adapters(tmp_path, hil):
    timing = PolicyTiming(yellow=4.0, all_red=0.0, min_green=7.0, max_green=45.0, decision_seconds=5.0)
    fleet = LocalFleet(tmp_path / "fleet")
    devices = write_fleet_devices(fleet, metadata(timing), ["J1", "J2"], hil=hil, hosts={"dev0": "10.77.0.1",
                                                                                        "dev1": "10.77.0.5"})
    assert devices == {"dev0": "J1", "dev1": "J2"}
    for k, device in enumerate(devices):
        path = fleet.devices / f"{device}.toml"
        raw = tomllib.loads(path.read_text())
        if hil:  # the simulation is the sensor, the heads and the clock: no files, no replay speed
            assert raw["sensor"] == {"adapter": "hil"} and raw["actuator"] == {"adapter": "hil"}
            assert raw["runtime"] == {"decision_seconds": 5.0}
        else:
            assert raw["sensor"]["adapter"] == "replay" and Path(raw["sensor"]["file"]).is_file()
            assert raw["actuator"]["adapter"] == "log" and raw["runtime"] == {"decision_seconds": 5.0, "speed": 10.0}
        assert raw["signal"] == {"green_phases": metadata(timing).phase_tables[devices[device]], "yellow": 4.0,
                                 "all_red": 0.0, "min_green": 7.0, "max_green": 45.0}
        assert raw["probation"] == {"decisions": 10} and raw["device"]["groups"] == ["local"]
        assert raw["broker"]["host"] == ("10.77.0.1", "10.77.0.5")[k]
        cfg = load_device_config(path)  # a valid device file
        assert cfg.signal.timing.min_green == 7.0 and cfg.runtime.decision_seconds == 5.0


def test_timing_metadata_is_optional_and_checked():
    timing = PolicyTiming(3.0, 0.0, 7.0, 50.0, 10.0)
    props = metadata(timing).to_props()
    assert json.loads(props[META_PREFIX + "timing"]) == {"yellow": 3.0, "all_red": 0.0, "min_green": 7.0,
                                                         "max_green": 50.0, "decision_seconds": 10.0}
    assert PolicyMetadata.from_props(props, "p.onnx").timing == timing
    older = {k: v for k, v in props.items() if k != META_PREFIX + "timing"}  # exported before the timing was
    assert PolicyMetadata.from_props(older, "p.onnx").timing == PolicyTiming(3.0, 2.0, 10.0, 60.0, 10.0)
    later = dict(props, **{META_PREFIX + "timing": json.dumps({**json.loads(props[META_PREFIX + "timing"]),
                                                               "cycle": 90})})
    assert PolicyMetadata.from_props(later, "p.onnx").timing == timing  # a key a later export adds is ignored
    for bad in ('{"yellow": 3}', '"fast"', '{"yellow": "3", "all_red": 2, "min_green": 10, "max_green": 60, '
                '"decision_seconds": 10}', "{"):
        with pytest.raises(RELEDError, match="not a RELED policy"):
            PolicyMetadata.from_props(dict(props, **{META_PREFIX + "timing": bad}), "p.onnx")


def test_export_records_the_timing_the_actor_was_trained_with():
    from trainer.export import ActorSource, trained_timing
    from trainer.marl.networks import Actor

    run = {"yellow": 3.0, "all_red": 0.0, "min_green": 7.0, "max_green": 60.0, "delta": 5.0}
    assert trained_timing(ActorSource(Actor(), "grid2x2", "moderate", run)) == PolicyTiming(3.0, 0.0, 7.0, 60.0, 5.0)
    assert trained_timing(ActorSource(Actor(), "grid2x2", "moderate", None)) == PolicyTiming()  # the scenario's


def test_fleet_down_with_nothing_there_says_so(tmp_path):
    proc = edge("fleet", "down", "--dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 0 and "nothing running" in proc.stdout, proc.stdout + proc.stderr


def test_fleet_down_leaves_a_reused_pid_alone(tmp_path, spawn):
    """A pid in fleet.json that is now another process (its command line does not name the fleet) survives."""
    folder = tmp_path / "fleet"
    folder.mkdir()
    sleeper = spawn(["sleep", "60"])
    (folder / FLEET_FILE).write_text(json.dumps({
        "format": "reled-fleet/1", "state": "running", "model": "/x.onnx", "scenario": "s", "hil": False,
        "devices": {"dev0": {"intersection": "J", "pid": sleeper.pid, "config": "devices/dev0.toml", "netns": None}},
        "collector": {"pid": sleeper.pid, "out": "rollouts"}, "broker_pid": sleeper.pid, "netem": None}))
    proc = edge("fleet", "down", "--dir", str(folder))
    assert proc.returncode == 0 and "nothing running" in proc.stdout, proc.stdout + proc.stderr
    assert sleeper.poll() is None and not gone(sleeper.pid)
