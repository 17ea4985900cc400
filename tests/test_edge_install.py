"""`reled-edge install`: a controller put on this machine for real, checked with os.stat and by running its daemon
as the service user.

Each test creates a real system user (``reled-test-<random>``), installs below a temp ``--root`` (never the real
/etc) and deletes the user, its group and any process it runs at teardown, passed or failed. The venv the daemon
runs from is built offline from a Python the service user can run (this machine's pyenv Python lives under
/root, 0700: the check must, and does, report that) with this checkout and the test venv's packages on its path.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge_runtime.device.device_config import load_device_config
from edge_runtime.device.layout import SERVICE_USER, Layout
from edge_runtime.device.unit import unit_text
from edge_runtime.fleet.local import EDGE, LocalFleet

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                                reason="installing a controller creates a user and gives it files: needs root")
GREENS = ["GGrr", "rrGG"]


def edge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=timeout)


def mode_owner(path: Path) -> tuple[int, str, str]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


@pytest.fixture
def service_user() -> Iterator[str]:
    """A fresh name for the service user (install creates it); the user, its group and its processes are removed
    at teardown."""
    name = f"reled-test-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            uid = None
        if uid is not None:
            procs = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
            for proc in procs:
                proc.kill()
            psutil.wait_procs(procs, timeout=10)
            subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def base_python(user: str | None = None) -> Path | None:
    """A Python of this minor version that ``user`` (any user when None: tried as nobody) can run."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(f"/usr/bin/python{version}"), Path(f"/usr/local/bin/python{version}")):
        if candidate.is_file():
            proc = subprocess.run([str(candidate), "-c", "pass"], user=user or "nobody", capture_output=True)
            if proc.returncode == 0:
                return candidate
    return None


@pytest.fixture(scope="module")
def runnable_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv any user can run, made offline: the system Python, this checkout and the test venv's packages."""
    python = base_python()
    if python is None:
        pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} outside /root that another user "
                    "can run (a venv for the service user needs one)")
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "reled-test.pth").write_text(f"{REPO}\n{sysconfig.get_paths()['purelib']}\n")
    script = venv / "bin" / "reled-edge"  # what pip writes for the console script
    script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom edge_runtime.cli import app\nsys.exit(app())\n")
    script.chmod(0o755)
    reachable(venv)
    return venv


def reachable(folder: Path) -> Path:
    """Let every user pass through ``folder`` and the folders above it up to /tmp (pytest's are 0700), as
    /etc, /var and /opt are on a controller."""
    for path in [folder, *folder.parents]:
        if path in (Path("/tmp"), path.parent):
            break
        path.chmod(path.stat().st_mode | 0o055)
    return folder


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A device file as `fleet up` writes it (loopback broker, its keys, a replay recording) for light X."""
    fleet = LocalFleet(tmp_path / "fleet")
    config = fleet.write_device("dev0", "X", GREENS, runtime={"decision_seconds": 1.0, "speed": 20.0})
    fleet.init_keys()
    return config


def install(device: Path, root: Path, user: str, venv: Path, *extra: str) -> subprocess.CompletedProcess:
    root.mkdir(exist_ok=True)
    reachable(root)
    return edge("install", "--config", str(device), "--root", str(root), "--user", user, "--venv", str(venv), *extra)


@needs_root
def test_install_puts_every_file_in_place_with_its_owner_and_mode_and_runs_again_unchanged(
        tmp_path, device, service_user, runnable_venv):
    root = tmp_path / "root"
    proc = install(device, root, service_user, runnable_venv)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"user {service_user}: create" in proc.stdout and f"checked as {service_user}" in proc.stdout
    layout, user = Layout(root), service_user
    entry = pwd.getpwnam(user)
    assert entry.pw_shell.endswith(("nologin", "false")) and entry.pw_uid < 1000, entry  # a system user, no login
    expected = {
        layout.etc: (0o750, "root", user), layout.devices: (0o750, "root", user),
        layout.state_dir("dev0"): (0o700, user, user), layout.logs: (0o750, user, user),
        layout.state_root: (0o755, "root", "root"),
        layout.secret("dev0"): (0o640, "root", user), layout.public_key: (0o644, "root", "root"),
        layout.recording("dev0"): (0o640, "root", user), layout.device_file("dev0"): (0o640, "root", user),
        layout.unit_file: (0o644, "root", "root"),
    }
    assert {path: mode_owner(path) for path in expected} == expected
    source = load_device_config(device)
    installed = load_device_config(layout.device_file("dev0"))
    assert installed.device.state_dir == layout.state_dir("dev0")
    assert installed.broker.password_file == layout.secret("dev0")
    assert installed.security.public_key == layout.public_key
    assert installed.sensor.file == layout.recording("dev0")
    assert installed.actuator.file == layout.signal_log("dev0")
    assert (installed.signal, installed.runtime, installed.broker.port) == \
        (source.signal, source.runtime, source.broker.port)
    assert layout.secret("dev0").read_bytes() == source.broker.password_file.read_bytes()
    unit = layout.unit_file.read_text()
    assert f"ExecStart={runnable_venv}/bin/reled-edge daemon --config {layout.devices}/%i.toml" in unit
    assert f"User={user}\nGroup={user}\n" in unit
    # again: nothing changes
    again = install(device, root, user, runnable_venv)
    assert again.returncode == 0, again.stdout + again.stderr
    outcomes = [line.rsplit(": ", 1)[-1] for line in again.stdout.splitlines() if line.startswith("  ")]
    assert outcomes and set(outcomes) <= {"kept", "unchanged", "exists", "skipped"}, again.stdout
    # a loosened secret and a state folder given away are put right
    layout.secret("dev0").chmod(0o644)
    os.chown(layout.state_dir("dev0"), 0, 0)
    fixed = install(device, root, user, runnable_venv)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"{layout.secret('dev0')} 0640 root:{user} ← {source.broker.password_file}: fixed (was 0644" in fixed.stdout
    assert mode_owner(layout.secret("dev0")) == (0o640, "root", user)
    assert mode_owner(layout.state_dir("dev0")) == (0o700, user, user)


@needs_root
def test_the_installed_daemon_runs_as_the_service_user_and_check_names_what_it_cannot_read(
        tmp_path, device, service_user, runnable_venv, spawn, wait_until):
    root, user = tmp_path / "root", service_user
    layout = Layout(root)
    assert install(device, root, user, runnable_venv).returncode == 0
    entry = pwd.getpwnam(user)
    log = tmp_path / "daemon.log"
    with log.open("w") as out:  # as systemd starts it: the unit's user, its ExecStart, a clean environment
        daemon = spawn([str(runnable_venv / "bin" / "reled-edge"), "daemon", "--config",
                        str(layout.device_file("dev0"))], user=entry.pw_uid, group=entry.pw_gid,
                       extra_groups=[], env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, cwd="/",
                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    signal_log = layout.signal_log("dev0")
    wait_until(lambda: (signal_log.exists() and len(signal_log.read_text().splitlines()) >= 5) or daemon.poll(), 60,
               "the daemon driving its signal as the service user")
    assert daemon.poll() is None, log.read_text()
    outbox = layout.state_dir("dev0") / "outbox.sqlite"
    wait_until(outbox.exists, 30, "the outbox in the state folder")
    assert (outbox.stat().st_uid, signal_log.stat().st_uid) == (entry.pw_uid, entry.pw_uid)
    assert install(device, root, user, runnable_venv, "--check").returncode == 0
    # what the service user cannot read or write is named, one line each
    layout.secret("dev0").chmod(0o600)  # root's alone now
    os.chown(layout.logs, 0, 0)
    proc = install(device, root, user, runnable_venv, "--check")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("error: 2 problem(s)"), proc.stderr
    assert f"[broker] password_file {layout.secret('dev0')}: Permission denied for {user}" in lines[0]
    assert f"[actuator] file {signal_log}: Permission denied for {user}" in lines[1]
    # a venv whose interpreter the user cannot reach: this test's own where it lives under /root (0700)
    try:
        subprocess.run([sys.executable, "-c", "pass"], user=entry.pw_uid, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        proc = install(device, root, user, Path(sys.prefix), "--check")
        assert proc.returncode == 2 and f"cannot be run by {user}: Permission denied" in proc.stderr, proc.stderr


@needs_root
def test_bad_input_and_a_dry_run_write_nothing(tmp_path, device, service_user, runnable_venv, assert_one_line_error):
    root = tmp_path / "root"
    plan = install(device, root, service_user, runnable_venv, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert f"file {Layout(root).secret('dev0')} 0640 root:{service_user}" in plan.stdout
    assert not any(root.iterdir())
    with pytest.raises(KeyError):
        pwd.getpwnam(service_user)
    # another light's recording
    other = tmp_path / "other.npz"
    np.savez(other, per_phase=np.zeros((5, 2, 3), np.float32), green_phases=np.array(["rrGG", "GGrr"]))
    assert_one_line_error(install(device, root, service_user, runnable_venv, "--recording", str(other)),
                          "green phases are ['rrGG', 'GGrr'], not this device's ['GGrr', 'rrGG']")
    # a key folder without this device's password
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(load_device_config(device).security.public_key, keys / "signing.pub")
    assert_one_line_error(install(device, root, service_user, runnable_venv, "--keys", str(keys)),
                          f"[broker] password_file {keys}/credentials/dev0.secret")
    assert_one_line_error(install(device, root, service_user, tmp_path / "no-venv"), "give --package")
    assert_one_line_error(install(device, root, "root", runnable_venv), "must not run as root")
    assert not any(root.iterdir())
    with pytest.raises(KeyError):
        pwd.getpwnam(service_user)


@pytest.mark.slow
@needs_root
def test_a_venv_that_pip_cannot_fill_is_removed(tmp_path, device, service_user, assert_one_line_error):
    """Offline, the package's dependencies cannot be installed: the half-made venv must not stay behind."""
    python = base_python()
    if python is None:
        pytest.skip("no system Python to create a venv with")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    venv = tmp_path / "opt" / "venv"
    proc = install(device, tmp_path / "root", service_user, venv, "--package", str(REPO), "--python", str(python),
                   "--find-links", str(wheels))
    assert_one_line_error(proc, f"pip install {REPO}[edge] into {venv} failed")
    assert not venv.exists()


def test_the_shipped_unit_is_the_rendered_one_and_systemd_accepts_it(tmp_path):
    import runpy

    tool = runpy.run_path(str(REPO / "tools" / "render_systemd_unit.py"))
    assert tool["UNIT_FILE"].read_text() == tool["standard_unit"](), \
        "run tools/render_systemd_unit.py: firmware_configs/systemd/reled-edge@.service is stale"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    venv = tmp_path / "venv"  # systemd checks that ExecStart exists
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "reled-edge").write_text("#!/bin/sh\n")
    (venv / "bin" / "reled-edge").chmod(0o755)
    for name, layout in (("system", Layout()), ("rooted", Layout(tmp_path / "root"))):
        units = tmp_path / name
        units.mkdir()
        (units / "reled-edge@.service").write_text(unit_text(layout, SERVICE_USER, SERVICE_USER, venv))
        (units / "reled-edge@dev0.service").symlink_to("reled-edge@.service")
        proc = subprocess.run(["systemd-analyze", "verify", str(units / "reled-edge@dev0.service")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
            f"{name}: {proc.stdout}{proc.stderr}"


def test_the_shipped_device_files_name_the_installed_layout():
    """What install renders for them is what they already say: the unit, the docs and the files agree."""
    layout = Layout()
    for path in sorted((REPO / "firmware_configs" / "devices").glob("*.toml")):
        config = load_device_config(path)
        device = config.id
        assert config.device.state_dir == layout.state_dir(device)
        assert config.broker.password_file == layout.secret(device)
        assert config.security.public_key == layout.public_key
        assert config.broker.ca_file == layout.ca_file
        assert config.sensor.file == layout.recording(device)
        assert config.actuator.file == layout.signal_log(device)
