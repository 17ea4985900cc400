"""`reled-edge install`: put one controller on this machine, as root, the way its systemd unit runs it.

The plan is a list of steps (the service user, the venv, folders, files, the unit, systemd's reload), each of
which says what it would do (``--dry-run``) and does only what is missing or wrong, so running it again changes
nothing. Everything is read and validated before the first step runs (device file, keys, recording), so bad
input leaves nothing behind; files are written through a temp file that has its final mode and owner before it
is renamed into place. Inputs the daemon only reads belong to root with the service group (0640: it can read
them, not change them); its state folder is its own (0700). ``check`` then verifies, as the service user, that
the daemon can read and write everything the installed device file names (:mod:`edge_runtime.device.access`).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from edge_runtime.device.access import APPEND, EXEC, READ, RUN, WRITE, Need, problems_as
from edge_runtime.device.device_config import DeviceConfig, load_device_config, named_inputs, profile_path
from edge_runtime.device.layout import SERVICE_USER, Layout
from edge_runtime.device.unit import unit_text
from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_path, read_toml

ROOT = "root"
PIP_SECONDS = 1800.0  # a Raspberry Pi builds nothing (wheels), but its SD card and link are slow


@dataclass(frozen=True)
class InstallRequest:
    """What `reled-edge install` was asked for."""

    config: Path  # the device file to install
    keys: Path | None = None  # a copy of the server's key folder; None: the files the device file names
    recording: Path | None = None  # the replay sensor's recording; None: the file the device file names
    root: Path = Path("/")
    user: str = SERVICE_USER
    create_user: bool = True
    venv: Path | None = None  # None: the layout's /opt/reled/.venv
    package: str | None = None  # what pip installs (with [edge]) into a venv it creates or updates
    python: Path = Path(sys.executable)  # creates a missing venv
    find_links: Path | None = None  # a wheel folder: pip installs offline from it

    @property
    def layout(self) -> Layout:
        return Layout(self.root.resolve())

    @property
    def venv_path(self) -> Path:
        return (self.venv or self.layout.venv).absolute()


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _ids(user: str, group: str) -> tuple[int, int]:
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise RELEDError(f"user {user!r} or group {group!r} does not exist") from exc


def _owner_text(path: Path) -> str:
    st = path.stat()
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{st.st_mode & 0o7777:04o} {user}:{group}"


def _run(command: list[str], what: str, timeout: float) -> None:
    """Run a setup command; RELEDError with its last words when it fails."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RELEDError(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise RELEDError(f"{what} failed: {last}")


# -- the steps ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserStep:
    name: str

    def describe(self) -> str:
        if _user(self.name) is not None:
            return f"user {self.name}: exists"
        return f"user {self.name}: create (system user, group {self.name}, no login shell, no home)"

    def apply(self) -> str:
        if _user(self.name) is not None:
            return "kept"
        if shutil.which("useradd") is None:
            raise RELEDError(f"useradd not found: create the system user {self.name!r} yourself and pass --no-user")
        shell = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "/bin/false")
        _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
              shell, "--comment", "RELED intersection controller", self.name], f"useradd {self.name}", 60)
        return "created"


@dataclass(frozen=True)
class VenvStep:
    path: Path
    python: Path
    package: str | None
    find_links: Path | None

    @property
    def exists(self) -> bool:
        return (self.path / "bin" / "python").exists()

    def requirement(self) -> str:
        package = self.package or ""
        return package if "[" in package else f"{package}[edge]"

    def describe(self) -> str:
        source = f" from {self.find_links} (offline)" if self.find_links else ""
        if self.exists:
            if self.package is None:
                return f"venv {self.path}: exists (checked at the end)"
            return f"venv {self.path}: pip install --upgrade {self.requirement()}{source}"
        return f"venv {self.path}: create with {self.python}, pip install {self.requirement()}{source}"

    def apply(self) -> str:
        created = not self.exists
        if not created and self.package is None:
            return "kept"
        if created:
            _run([str(self.python), "-m", "venv", str(self.path)], f"creating the venv {self.path}", 300)
        pip = [str(self.path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--upgrade"]
        if self.find_links is not None:
            pip += ["--no-index", "--find-links", str(self.find_links)]
        try:
            _run([*pip, self.requirement()], f"pip install {self.requirement()} into {self.path}", PIP_SECONDS)
        except RELEDError:
            if created:  # nothing half-made stays behind
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        if not (self.path / "bin" / "reled-edge").exists():
            raise RELEDError(f"{self.path}/bin/reled-edge is missing after pip install {self.requirement()}: "
                             "--package must be reled (a wheel, its folder or a requirement)")
        return "created" if created else "updated"


@dataclass(frozen=True)
class FolderStep:
    path: Path
    user: str
    group: str
    mode: int
    fix: bool = True  # False: a system folder (/etc/systemd/system) is created if missing, never changed

    def describe(self) -> str:
        return f"folder {self.path} {self.mode:04o} {self.user}:{self.group}"

    def apply(self) -> str:
        created = not self.path.exists()
        if not created and not self.fix:
            return "exists"
        before = "" if created else _owner_text(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        uid, gid = _ids(self.user, self.group)
        os.chown(self.path, uid, gid)
        os.chmod(self.path, self.mode)
        if created:
            return "created"
        return "unchanged" if before == _owner_text(self.path) else f"fixed (was {before})"


@dataclass(frozen=True)
class FileStep:
    path: Path
    data: bytes
    user: str
    group: str
    mode: int
    source: str

    def describe(self) -> str:
        return f"file {self.path} {self.mode:04o} {self.user}:{self.group} ← {self.source}"

    def apply(self) -> str:
        uid, gid = _ids(self.user, self.group)
        exists = self.path.is_file()
        same = exists and self.path.read_bytes() == self.data
        if same:
            st = self.path.stat()
            if (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (self.mode, uid, gid):
                return "unchanged"
        before = _owner_text(self.path) if exists else ""
        with atomic_path(self.path, self.mode) as tmp:  # final mode before the first byte, owner before the rename
            tmp.write_bytes(self.data)
            os.chown(tmp, uid, gid)
            os.chmod(tmp, self.mode)
        if not exists:
            return "created"
        return "updated" if not same else f"fixed (was {before})"


@dataclass(frozen=True)
class ReloadStep:
    layout: Layout

    def skipped(self) -> str | None:
        if not self.layout.system:
            return f"--root {self.layout.root} is not this machine's tree"
        if not Path("/run/systemd/system").is_dir():
            return "systemd is not running here (no /run/systemd/system)"
        if shutil.which("systemctl") is None:
            return "systemctl not found"
        return None

    def describe(self) -> str:
        reason = self.skipped()
        return "systemctl daemon-reload" + (f": skipped ({reason})" if reason else "")

    def apply(self) -> str:
        if self.skipped() is not None:
            return "skipped"
        _run(["systemctl", "daemon-reload"], "systemctl daemon-reload", 60)
        return "done"


Step = UserStep | VenvStep | FolderStep | FileStep | ReloadStep


# -- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything an install does, built (and every input read and validated) before anything is written."""

    config: DeviceConfig
    user: str
    group: str
    steps: list[Step] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.config.id


def service_group(request: InstallRequest) -> str:
    """The service user's primary group (``useradd --user-group`` names it after the user)."""
    entry = _user(request.user)
    if entry is None:
        if not request.create_user:
            raise RELEDError(f"user {request.user!r} does not exist: create it or leave out --no-user")
        return request.user
    if entry.pw_uid == 0:
        raise RELEDError("the controller must not run as root: give --user a system user (default reled)")
    return grp.getgrgid(entry.pw_gid).gr_name


def _sources(request: InstallRequest, config: DeviceConfig) -> dict[str, Path]:
    """Where each input comes from: the key folder and --recording when given, else the files the device file
    names (so the device files `fleet up` writes install as they are)."""
    sources: dict[str, Path] = {}
    keys = None
    if request.keys is not None:
        from edge_runtime.keys import KeyFolder

        keys = KeyFolder(request.keys)
    sources["[security] public_key"] = keys.public_key_path if keys else config.security.public_key
    sources["[broker] password_file"] = keys.secret_path(config.username) if keys else config.broker.password_file
    if config.broker.ca_file is not None:
        sources["[broker] ca_file"] = keys.tls_dir / "ca.crt" if keys else config.broker.ca_file
    if config.sensor.adapter == "replay":
        recording = request.recording or config.sensor.file
        if recording is None:
            raise RELEDError(f"{config.path}: [sensor] adapter 'replay' needs a recording: give --recording FILE "
                             "(`reled record` makes one per light)")
        sources["[sensor] file"] = recording
    if config.device.profile:
        sources["profile"] = profile_path(config.path, config.device.profile)
    missing = [f"{what} {path}" for what, path in sources.items() if not path.is_file()]
    if missing:
        raise RELEDError(f"cannot install {config.id}: {'; '.join(missing)} not found" +
                         ("" if keys else " (give --keys DIR: a copy of the server's key folder)"))
    return sources


def _validate(config: DeviceConfig, sources: dict[str, Path]) -> None:
    """Refuse inputs the daemon would refuse, before anything is written."""
    from edge_runtime.credentials import load_public_key, read_password
    from edge_runtime.device.adapters import ReplaySensor

    load_public_key(sources["[security] public_key"])
    if not read_password(sources["[broker] password_file"]):
        raise RELEDError(f"password file {sources['[broker] password_file']} is empty")
    if "[sensor] file" in sources:
        ReplaySensor(sources["[sensor] file"], len(config.signal.green_phases), config.signal.green_phases)


def rendered_device_file(request: InstallRequest, config: DeviceConfig) -> str:
    """The device file with every path it names moved to the installed layout."""
    layout, device = request.layout, config.id
    raw: dict[str, Any] = read_toml(request.config)
    paths = {("device", "state_dir"): layout.state_dir(device),
             ("broker", "password_file"): layout.secret(device),
             ("security", "public_key"): layout.public_key}
    if config.broker.ca_file is not None:
        paths["broker", "ca_file"] = layout.ca_file
    if config.sensor.adapter == "replay":
        paths["sensor", "file"] = layout.recording(device)
    if config.actuator.file is not None:
        paths["actuator", "file"] = layout.signal_log(device)
    for (section, key), path in paths.items():
        raw.setdefault(section, {})[key] = str(path)
    return (f"# {device}: rendered by `reled-edge install` from {request.config.resolve()}; "
            f"paths are the installed ones\n" + tomli_w.dumps(raw))


def plan(request: InstallRequest) -> Plan:
    """The steps of an install (nothing is written): every input is read and checked here."""
    config = load_device_config(request.config)
    layout, device = request.layout, config.id
    group = service_group(request)
    sources = _sources(request, config)
    _validate(config, sources)
    result = Plan(config, request.user, group)
    steps = result.steps
    if request.create_user:
        steps.append(UserStep(request.user))
    venv = request.venv_path
    if not (venv / "bin" / "python").exists() and request.package is None:
        raise RELEDError(f"venv {venv} does not exist: give --package (a reled wheel or folder) to create it, or "
                         "--venv PATH of an existing one")
    steps.append(VenvStep(venv, request.python, request.package, request.find_links))
    user = request.user
    steps += [FolderStep(layout.etc, ROOT, group, 0o750), FolderStep(layout.devices, ROOT, group, 0o750)]
    if config.device.profile:
        steps.append(FolderStep(layout.profiles, ROOT, group, 0o750))
    steps += [FolderStep(layout.state_root, ROOT, ROOT, 0o755),
              FolderStep(layout.state_dir(device), user, group, 0o700), FolderStep(layout.logs, user, group, 0o750),
              FolderStep(layout.unit_file.parent, ROOT, ROOT, 0o755, fix=False)]

    def copy(what: str, target: Path, owner: str, owner_group: str, mode: int) -> None:
        steps.append(FileStep(target, sources[what].read_bytes(), owner, owner_group, mode, str(sources[what])))

    copy("[security] public_key", layout.public_key, ROOT, ROOT, 0o644)  # public: devices pin it
    copy("[broker] password_file", layout.secret(device), ROOT, group, 0o640)  # secret: the daemon reads it
    if "[broker] ca_file" in sources:
        copy("[broker] ca_file", layout.ca_file, ROOT, ROOT, 0o644)
    if "[sensor] file" in sources:
        copy("[sensor] file", layout.recording(device), ROOT, group, 0o640)
    if config.device.profile:
        copy("profile", layout.profiles / f"{config.device.profile}.toml", ROOT, group, 0o640)
    steps.append(FileStep(layout.device_file(device), rendered_device_file(request, config).encode(), ROOT, group,
                          0o640, f"{request.config} (paths rendered)"))
    steps.append(FileStep(layout.unit_file, unit_text(layout, user, group, venv).encode(), ROOT, ROOT, 0o644,
                          "the unit for this layout"))
    steps.append(ReloadStep(layout))
    return result


def apply(steps: list[Step], progress: Callable[[str, str], None]) -> None:
    """Run each step; ``progress(description, outcome)`` after each one."""
    if os.geteuid() != 0:
        raise RELEDError("installing a controller needs root (it creates a user and gives files to it): run it "
                         "with sudo, or --dry-run to see the plan")
    for step in steps:
        description = step.describe()
        progress(description, step.apply())


# -- the check ------------------------------------------------------------------------------------
def check(request: InstallRequest) -> tuple[str, list[str]]:
    """The device id, and what keeps its installed controller from running, one line each, tried as the service
    user."""
    source = load_device_config(request.config)
    layout, device = request.layout, source.id
    installed = layout.device_file(device)
    if not installed.is_file():
        return device, [f"{installed} does not exist: run `reled-edge install` without --check"]
    config = load_device_config(installed)
    venv = request.venv_path
    needs = [Need("device file", installed)]
    if config.device.profile:
        needs.append(Need("profile", profile_path(installed, config.device.profile)))
    needs += [Need(what, path, READ) for what, path in named_inputs(config).items()]
    needs.append(Need("[device] state_dir", config.device.state_dir, WRITE))
    if config.actuator.file is not None:
        needs.append(Need("[actuator] file", config.actuator.file, APPEND))
    needs += [Need("venv", venv / "bin" / "python", RUN), Need("ExecStart", venv / "bin" / "reled-edge", EXEC)]
    problems = problems_as(request.user, needs)
    secret = config.broker.password_file
    if secret.is_file() and secret.stat().st_mode & 0o007:
        problems.append(f"[broker] password_file {secret} is readable by every user ({_owner_text(secret)}): "
                        "run `reled-edge install` again")
    entry = _user(request.user)
    group = grp.getgrgid(entry.pw_gid).gr_name if entry else request.user
    if not layout.unit_file.is_file():
        problems.append(f"systemd unit {layout.unit_file} does not exist: run `reled-edge install` again")
    elif layout.unit_file.read_text() != unit_text(layout, request.user, group, venv):
        problems.append(f"systemd unit {layout.unit_file} is not the one for user {request.user} and venv {venv}: "
                        "run `reled-edge install` again")
    return device, problems
