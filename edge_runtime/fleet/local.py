"""A fleet of real controllers on this machine: Mosquitto, key folder, device files, daemon processes.

Tests and `tools/bench/edge_bench.py` build on it; `reled-edge fleet up` runs it by hand to try
deployments without hardware:

    reled-edge fleet up --policy policy.onnx --devices 3 --dir /tmp/fleet

starts a broker and one daemon per light of the policy (replaying synthetic detector data) and leaves
them running until Ctrl-C (``--deploy``: deploys the policy, prints the status and stops). Meanwhile:

    reled-edge deploy --keys /tmp/fleet/keys --broker-dir /tmp/fleet/broker --devices /tmp/fleet/devices \
        --group local --model policy.onnx
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.fileio import atomic_write_text
from edge_runtime.fleet.broker import BrokerInfo
from edge_runtime.fleet.server import ServerLink, server_address
from edge_runtime.keys import KeyFolder

EDGE = [sys.executable, "-m", "edge_runtime"]


def free_port(*taken: int) -> int:
    """A free 127.0.0.1 port other than ``taken`` (ports handed out already but not bound yet)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


def synthetic_replay(path: Path, n_phases: int, steps: int = 600, seed: int = 0) -> Path:
    """Detector readings with rush-hour-like waves (queued, approaching, longest wait per phase)."""
    rng = np.random.default_rng(seed)
    wave = 4 + 3 * np.sin(np.linspace(0, 6 * np.pi, steps))[:, None]
    queue = rng.poisson(wave * rng.uniform(0.5, 1.5, n_phases))
    approaching = rng.poisson(wave / 2 * np.ones(n_phases))
    wait = queue * rng.uniform(2, 8, (steps, n_phases))
    np.savez(path, per_phase=np.stack([queue, approaching, wait], axis=-1).astype(np.float32))
    return path


def toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


@dataclass
class LocalFleet:
    """Broker, keys, device files and daemons under ``root``; :meth:`close` stops everything it started."""

    root: Path
    port: int = field(default_factory=free_port)  # the devices' listener
    server_port: int = 0  # the fleet tools' listener (0: a free port)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    background: list[subprocess.Popen] = field(default_factory=list)
    observers: list[ServerLink] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()  # device files name absolute paths
        self.server_port = self.server_port or free_port(self.port)
        self.keys = self.root / "keys"
        self.broker_dir = self.root / "broker"
        self.devices = self.root / "devices"
        self.devices.mkdir(parents=True, exist_ok=True)

    def _command(self, args: tuple[str, ...]) -> list[str]:
        """`reled-edge ARGS`, with this fleet's keys, broker and device folder for the fleet commands."""
        extra = ["--keys", str(self.keys), "--broker-dir", str(self.broker_dir)] \
            if args[0] in ("deploy", "status", "rollback", "collect") else []
        if args[0] == "deploy":
            extra += ["--devices", str(self.devices)]
        return [*EDGE, *args, *extra]

    def edge(self, *args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        """Run `reled-edge` as a user would and wait for it."""
        proc = subprocess.run(self._command(args), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"reled-edge {' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def edge_background(self, *args: str, log: Path) -> subprocess.Popen:
        """Start `reled-edge ARGS` without waiting (output to ``log``); :meth:`close` kills it if still running."""
        with log.open("w") as out:
            proc = subprocess.Popen(self._command(args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append(proc)
        return proc

    def write_device(self, device: str, /, intersection: str, greens: list[str], replay_seed: int = 0,
                     groups: tuple[str, ...] = ("local",), **sections: dict[str, Any]) -> Path:
        replay = synthetic_replay(self.root / f"{device}.replay.npz", len(greens), seed=replay_seed)
        body: dict[str, dict[str, Any]] = {
            "device": {"id": device, "intersection": intersection, "state_dir": str(self.root / "state" / device),
                       "groups": list(groups)},
            "signal": {"green_phases": greens},
            "broker": {"host": "127.0.0.1", "port": self.port,
                       "password_file": str(KeyFolder(self.keys).secret_path(device))},
            "security": {"public_key": str(KeyFolder(self.keys).public_key_path)},
            "sensor": {"adapter": "replay", "file": str(replay)},
            "actuator": {"adapter": "log", "file": str(self.root / f"{device}.signal.log")},
        }
        for name, values in sections.items():
            body.setdefault(name, {}).update(values)
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"
                       for name, values in body.items())
        path = self.devices / f"{device}.toml"
        atomic_write_text(path, text)
        return path

    def init_keys(self) -> None:
        self.edge("keys", "init", "--keys", str(self.keys), "--devices", str(self.devices), check=True)

    def start_broker(self, tls_port: int | None = None, *extra: str) -> None:
        """`reled-edge broker start` on this fleet's ports (``extra``: more options, e.g. --tls-only)."""
        args = ["broker", "start", "--keys", str(self.keys), "--dir", str(self.broker_dir), "--port", str(self.port),
                "--server-port", str(self.server_port), *extra]
        if tls_port is not None:
            args += ["--tls-port", str(tls_port)]
        self.edge(*args, check=True)

    def broker_pid(self) -> int:
        return BrokerInfo.read(self.broker_dir).pid

    def kill_broker(self) -> None:
        """SIGKILL: no goodbye, no persistence save (what a crash or a power cut does)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.broker_pid(), signal.SIGKILL)
        time.sleep(0.2)

    def stop_broker(self) -> None:
        self.edge("broker", "stop", "--dir", str(self.broker_dir))

    def start_daemon(self, device: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``device``'s daemon (``env``: extra environment variables for it)."""
        with (self.root / f"{device}.daemon.log").open("a") as log:
            proc = subprocess.Popen([*EDGE, "daemon", "--config", str(self.devices / f"{device}.toml")],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        self.daemons[device] = proc
        return proc

    def check_daemons(self, settle: float = 2.0) -> None:
        """Raise with the log's last line if a daemon exited (a bad device file, a missing key)."""
        time.sleep(settle)
        for device, proc in self.daemons.items():
            if proc.poll() is not None:
                lines = (self.root / f"{device}.daemon.log").read_text().strip().splitlines() or ["no log"]
                raise RuntimeError(f"daemon {device} exited with {proc.returncode}: {lines[-1]}")

    def kill_daemon(self, device: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for the daemon to exit (SIGKILL after 20 s if it does not)."""
        proc = self.daemons.pop(device)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)

    def state(self, device: str) -> dict[str, Any]:
        path = self.root / "state" / device / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def observer(self, extra: list[str] | None = None) -> ServerLink:
        """A server connection that records what the devices report (closed by :meth:`close`)."""
        keys = KeyFolder(self.keys)
        link = ServerLink(keys, server_address(keys, self.broker_dir, None, None), "observer", extra or []).start()
        self.observers.append(link)
        return link

    def close(self) -> None:
        """Stop what this fleet started: observers, background commands, daemons, then the broker."""
        for link in self.observers:
            with contextlib.suppress(Exception):
                link.close()
        for proc in self.background:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)
        for device in list(self.daemons):
            with contextlib.suppress(Exception):
                self.kill_daemon(device, signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.stop_broker()


def wait_for(predicate: Any, timeout: float, what: str, poll: Any = None) -> Any:
    """Poll until ``predicate()`` is truthy; ``poll`` (e.g. a ServerLink.pump) runs between tries."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if poll is not None:
            poll()
        else:
            time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def up(policy: Path, devices: int, folder: Path, deploy: bool) -> int:
    """`reled-edge fleet up`: one daemon per light of ``policy`` (at most ``devices``) on a fresh broker;
    with ``deploy``, deploy the policy, print the fleet's status and stop, else run until Ctrl-C or SIGTERM.
    Returns the exit code."""
    from edge_runtime.policy import OnnxPolicy

    tables = list(OnnxPolicy(policy).meta.phase_tables.items())[:devices]
    fleet = LocalFleet(folder)
    for k, (light, greens) in enumerate(tables):  # replayed 10x faster than real time: probation takes 10 s
        fleet.write_device(f"dev{k}", light, greens, replay_seed=k, runtime={"speed": 10.0},
                           probation={"decisions": 10})
    fleet.init_keys()
    fleet.start_broker()
    for k in range(len(tables)):
        fleet.start_daemon(f"dev{k}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`, systemd: still stop the fleet
    try:
        fleet.check_daemons()
        if deploy:
            for command in (("deploy", "--group", "local", "--model", str(policy), "--timeout", "120"),
                            ("status",)):
                proc = fleet.edge(*command)
                sys.stdout.write(proc.stdout + proc.stderr)
                sys.stdout.flush()
                if proc.returncode != 0:
                    return proc.returncode
            return 0
        print(f"broker on 127.0.0.1:{fleet.port}, {len(tables)} controllers; Ctrl-C stops them", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        fleet.close()
    return 0
