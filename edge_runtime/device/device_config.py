"""A controller's configuration: its device file (``firmware_configs/devices/*.toml``) over its hardware profile.

The device file names a profile (``firmware_configs/profiles/<name>.toml``: inference threads and providers,
latency budget, safety timings); any section of the device file overrides the profile's. Relative paths
are resolved against the device file's folder. Unknown keys are refused so a typo never silently
falls back to a default on a street controller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError
from edge_runtime.protocol import check_device_id
from edge_runtime.settings import build_section, read_sections
from edge_runtime.shield import SignalTiming


@dataclass(frozen=True)
class DeviceSection:
    id: str
    intersection: str
    state_dir: Path
    profile: str = ""
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class SignalSection:
    green_phases: tuple[str, ...]  # the intersection's green phases as SUMO state strings, in order
    yellow: float = 3.0
    all_red: float = 2.0
    min_green: float = 10.0
    max_green: float = 60.0
    fallback_green: float = 30.0  # fixed-time plan: seconds of green per phase when the policy is unhealthy

    @property
    def timing(self) -> SignalTiming:
        return SignalTiming(self.yellow, self.all_red, self.min_green, self.max_green)


@dataclass(frozen=True)
class BrokerSection:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""  # default: the device id
    password_file: Path = Path("device.secret")
    ca_file: Path | None = None


@dataclass(frozen=True)
class SecuritySection:
    public_key: Path = Path("signing.pub")
    max_model_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class InferenceSection:
    threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    latency_budget_ms: float = 5.0  # a slower decision counts as a failure


@dataclass(frozen=True)
class RuntimeSection:
    decision_seconds: float = 10.0
    speed: float = 1.0  # replay only: signal seconds per wall second
    max_decisions: int = 0  # stop deciding after this many recorded decisions (0: never)


HIL_ADAPTER = "hil"  # sensor and actuator together: a simulation over MQTT (edge_runtime.device.hil)


@dataclass(frozen=True)
class SensorSection:
    adapter: str = "replay"  # replay | hil
    file: Path | None = None


@dataclass(frozen=True)
class ActuatorSection:
    adapter: str = "log"  # log | hil
    file: Path | None = None


@dataclass(frozen=True)
class DownloadSection:
    window: int = 8  # chunks requested at once
    chunk_timeout: float = 3.0  # re-request a chunk not received within this many seconds
    kbps: float = 0.0  # download rate cap in KiB/s, so a cellular link stays usable (0: none)
    max_bad_chunks: int = 5  # chunks failing their hash before the deploy is abandoned


@dataclass(frozen=True)
class ProbationSection:
    decisions: int = 30  # healthy decisions before a new model is committed
    max_failures: int = 2  # failed or too-slow decisions tolerated during probation (an OS hiccup is not a bad model)
    keep_models: int = 2  # previous models kept for instant rollback


@dataclass(frozen=True)
class RolloutSection:
    batch_rows: int = 256
    flush_seconds: float = 5.0
    resend_seconds: float = 10.0
    max_rows: int = 1_000_000  # outbox cap; the oldest rows are dropped beyond it


@dataclass(frozen=True)
class DeviceConfig:
    path: Path
    device: DeviceSection
    signal: SignalSection
    broker: BrokerSection = field(default_factory=BrokerSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    sensor: SensorSection = field(default_factory=SensorSection)
    actuator: ActuatorSection = field(default_factory=ActuatorSection)
    download: DownloadSection = field(default_factory=DownloadSection)
    probation: ProbationSection = field(default_factory=ProbationSection)
    rollouts: RolloutSection = field(default_factory=RolloutSection)

    @property
    def id(self) -> str:
        return self.device.id

    @property
    def username(self) -> str:
        return self.broker.username or self.device.id

    @property
    def hil(self) -> bool:
        """Hardware-in-the-loop: detectors and heads are a simulation's, over MQTT (`reled hil run`)."""
        return self.sensor.adapter == HIL_ADAPTER


_TYPES = {"device": DeviceSection, "signal": SignalSection, "broker": BrokerSection, "security": SecuritySection,
          "inference": InferenceSection, "runtime": RuntimeSection, "sensor": SensorSection,
          "actuator": ActuatorSection, "download": DownloadSection, "probation": ProbationSection,
          "rollouts": RolloutSection}


def profile_path(device_file: Path, name: str) -> Path:
    return device_file.parent.parent / "profiles" / f"{name}.toml"


def load_device_config(path: Path) -> DeviceConfig:
    """The merged, validated configuration, or a one-line error naming the file and the key."""
    data = read_sections(path, _TYPES)
    name = data.get("device", {}).get("profile", "")
    merged: dict[str, dict[str, Any]] = {}
    if name:
        profile_file = profile_path(path, name)
        if not profile_file.is_file():
            raise RELEDError(f"{path}: profile {name!r} not found at {profile_file}")
        for section, values in read_sections(profile_file, _TYPES).items():
            merged.setdefault(section, {}).update(values)
    for section, values in data.items():
        merged.setdefault(section, {}).update(values)
    sections = {name: build_section(str(path), name, merged.get(name, {}), cls, base=path.parent)
                for name, cls in _TYPES.items() if name in merged or name not in ("device", "signal")}
    for required in ("device", "signal"):
        if required not in sections:
            raise RELEDError(f"{path}: missing [{required}] section")
    config = DeviceConfig(path=path, **sections)
    try:
        check_device_id(config.device.id)
        config.signal.timing  # noqa: B018  (validates the timings)
    except ValueError as exc:
        raise RELEDError(f"{path}: {exc}") from exc
    if len(config.signal.green_phases) < 2:
        raise RELEDError(f"{path}: [signal] green_phases needs at least 2 phases")
    if (config.sensor.adapter == HIL_ADAPTER) != (config.actuator.adapter == HIL_ADAPTER):
        raise RELEDError(f"{path}: [sensor] and [actuator] adapter must both be {HIL_ADAPTER!r} or neither "
                         "(hardware-in-the-loop replaces both)")
    probation = config.probation
    if not 0 <= probation.max_failures < probation.decisions:
        raise RELEDError(f"{path}: [probation] max_failures = {probation.max_failures} must be below decisions = "
                         f"{probation.decisions}, or a model that fails every decision would be committed")
    return config


def device_files(folder: Path) -> dict[str, DeviceConfig]:
    """Every device file in ``folder`` by device id (the server's view of the fleet)."""
    if not folder.is_dir():
        raise RELEDError(f"device folder {folder} does not exist: give --devices DIR")
    configs = [load_device_config(p) for p in sorted(folder.glob("*.toml"))]
    by_id: dict[str, DeviceConfig] = {}
    for config in configs:
        if config.id in by_id:
            raise RELEDError(f"device id {config.id!r} appears in {by_id[config.id].path} and {config.path}")
        by_id[config.id] = config
    return by_id


def _creatable(folder: Path) -> bool:
    """A writable folder, or one that can be made: its nearest existing parent is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def named_inputs(config: DeviceConfig) -> dict[str, Path]:
    """The files the daemon reads, by the key that names them (the device file and profile aside)."""
    inputs = {"[broker] password_file": config.broker.password_file,
              "[security] public_key": config.security.public_key,
              "[broker] ca_file": config.broker.ca_file, "[sensor] file": config.sensor.file}
    return {name: path for name, path in inputs.items() if path is not None}


def file_problems(config: DeviceConfig) -> list[str]:
    """Every file the device file names that the daemon would fail on (``daemon --check``): missing inputs, and
    state and log folders that can be neither written nor created."""
    problems = [f"{name} {path} does not exist" for name, path in named_inputs(config).items() if not path.is_file()]
    if config.sensor.adapter == "replay" and config.sensor.file is None:
        problems.append("[sensor] adapter 'replay' needs file = \"recording.npz\"")
    outputs = {"[device] state_dir": config.device.state_dir,
               "[actuator] file's folder": config.actuator.file.parent if config.actuator.file else None}
    problems += [f"{name} {folder} can be neither written nor created" for name, folder in outputs.items()
                 if folder is not None and not _creatable(folder)]
    return problems
