"""A fleet of real controllers on this machine: Mosquitto, key folder, device files, daemon processes.

Tests and `tools/bench/edge_bench.py` build on :class:`LocalFleet`; `reled-edge fleet up` (:func:`up`) starts
one controller per light of a policy, detached, and `reled-edge fleet down` (:func:`down`) stops it:

    reled-edge fleet up --model policy.onnx --dir /tmp/fleet --replay
    reled-edge status --keys /tmp/fleet/keys --broker-dir /tmp/fleet/broker
    reled-edge fleet down --dir /tmp/fleet

``FLEET/fleet.json`` says what runs (pids, namespaces); it is rewritten after every step of `fleet up`, so
`fleet down` can stop what a `fleet up` that died half-way had started. A process is signalled only while
its command line still names this fleet (a pid reused since is left alone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from edge_runtime.fleet import broker, netns
from edge_runtime.fleet.broker import BrokerInfo, command_line
from edge_runtime.fleet.server import ServerLink, server_address
from edge_runtime.keys import KeyFolder
from edge_runtime.recordings import recording_name

if TYPE_CHECKING:
    from edge_runtime.mqtt import Message
    from edge_runtime.policy import PolicyMetadata

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Site:
    """A site broker of a local fleet (:meth:`LocalFleet.add_site`), bridged to the fleet's central broker."""

    name: str
    folder: Path
    port: int  # its devices' listener
    server_port: int  # its own tools' listener


@dataclass
class LocalFleet:
    """Broker, keys, device files and daemons under ``root``; :meth:`close` stops everything it started. With
    :meth:`add_site`, site brokers bridged to that broker, which is then the central one."""

    root: Path
    port: int = field(default_factory=free_port)  # the devices' listener
    server_port: int = 0  # the fleet tools' listener (0: a free port)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    background: list[subprocess.Popen] = field(default_factory=list)
    observers: list[ServerLink] = field(default_factory=list)
    sites: dict[str, Site] = field(default_factory=dict)

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
            proc = subprocess.Popen(self._command(args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.background.append(proc)
        return proc

    def write_device(self, device: str, /, intersection: str, greens: list[str], replay_seed: int = 0,
                     groups: tuple[str, ...] = ("local",), hil: bool = False, site: str | None = None,
                     recording: Path | None = None, **sections: dict[str, Any]) -> Path:
        """``device``'s file: a replay sensor (of ``recording``, from `reled record`, else synthetic) and a log
        actuator, or with ``hil`` the simulation's (`reled hil run` drives time, reads the heads and sends detector
        readings); ``site``: the device connects to that site broker instead of the central one; ``sections``
        override."""
        if hil:
            io: dict[str, dict[str, Any]] = {"sensor": {"adapter": "hil"}, "actuator": {"adapter": "hil"}}
        else:
            replay = self.root / f"{device}.replay.npz"
            if recording is not None:
                atomic_write_bytes(replay, recording.read_bytes())
            else:
                synthetic_replay(replay, len(greens), seed=replay_seed)
            io = {"sensor": {"adapter": "replay", "file": str(replay)},
                  "actuator": {"adapter": "log", "file": str(self.root / f"{device}.signal.log")}}
        body: dict[str, dict[str, Any]] = {
            "device": {"id": device, "intersection": intersection, "state_dir": str(self.root / "state" / device),
                       "groups": list(groups)},
            "signal": {"green_phases": greens},
            "broker": {"host": "127.0.0.1", "port": self.sites[site].port if site else self.port,
                       "password_file": str(KeyFolder(self.keys).secret_path(device))},
            "security": {"public_key": str(KeyFolder(self.keys).public_key_path)},
            **io,
        }
        for name, values in sections.items():
            body.setdefault(name, {}).update(values)
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()) + "\n"
                       for name, values in body.items())
        path = self.devices / f"{device}.toml"
        atomic_write_text(path, text)
        return path

    def init_keys(self) -> None:
        sites = [a for name in self.sites for a in ("--site", name)]
        self.edge("keys", "init", "--keys", str(self.keys), "--devices", str(self.devices), *sites, check=True)

    def add_site(self, name: str) -> Site:
        """A site broker's folder and free ports (before :meth:`init_keys`, which gives it bridge credentials)."""
        taken = [self.port, self.server_port, *(p for s in self.sites.values() for p in (s.port, s.server_port))]
        port = free_port(*taken)
        site = Site(name, self.root / "sites" / name, port, free_port(*taken, port))
        self.sites[name] = site
        return site

    def start_site(self, name: str, central_port: int | None = None, *extra: str) -> str:
        """`reled-edge broker start --bridge-to` for site ``name``, bridged to the central broker's device port (or
        ``central_port``, e.g. its TLS port with ``extra`` --bridge-ca); returns what it printed."""
        site = self.sites[name]
        return self.edge("broker", "start", "--keys", str(self.keys), "--dir", str(site.folder), "--port",
                         str(site.port), "--server-port", str(site.server_port), "--bridge-to",
                         f"127.0.0.1:{central_port or self.port}", "--site", name, *extra, check=True).stdout

    def broker_folder(self, site: str | None = None) -> Path:
        """The central broker's folder, or site ``site``'s."""
        return self.sites[site].folder if site else self.broker_dir

    def start_broker(self, tls_port: int | None = None, *extra: str) -> None:
        """`reled-edge broker start` on this fleet's ports (``extra``: more options, e.g. --tls-only)."""
        args = ["broker", "start", "--keys", str(self.keys), "--dir", str(self.broker_dir), "--port", str(self.port),
                "--server-port", str(self.server_port), *extra]
        if tls_port is not None:
            args += ["--tls-port", str(tls_port)]
        self.edge(*args, check=True)

    def broker_pid(self, site: str | None = None) -> int:
        return BrokerInfo.read(self.broker_folder(site)).pid

    def kill_broker(self, site: str | None = None) -> None:
        """SIGKILL (the central broker, or site ``site``'s): no goodbye, no persistence save (a crash, a power cut)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.broker_pid(site), signal.SIGKILL)
        time.sleep(0.2)

    def stop_broker(self, site: str | None = None) -> None:
        self.edge("broker", "stop", "--dir", str(self.broker_folder(site)))

    def start_daemon(self, device: str, env: dict[str, str] | None = None,
                     prefix: list[str] | None = None) -> subprocess.Popen:
        """Start ``device``'s daemon in a session of its own (``env``: extra environment variables for it;
        ``prefix``: what runs it, e.g. `ip netns exec NAME`)."""
        command = [*(prefix or []), *EDGE, "daemon", "--config", str(self.devices / f"{device}.toml")]
        with (self.root / f"{device}.daemon.log").open("a") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **(env or {})})
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

    def observer(self, extra: list[str] | None = None, site: str | None = None) -> ServerLink:
        """A server connection (to the central broker, or site ``site``'s) that records what the devices report
        (closed by :meth:`close`)."""
        keys = KeyFolder(self.keys)
        link = ServerLink(keys, server_address(keys, self.broker_folder(site), None, None), "observer",
                          extra or []).start()
        self.observers.append(link)
        return link

    def close(self) -> None:
        """Stop what this fleet started: observers, background commands, daemons, then the brokers."""
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
        for site in [*self.sites, None]:
            with contextlib.suppress(Exception):
                self.stop_broker(site)


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


# -- `reled-edge fleet up` / `fleet down` -----------------------------------------------------------
FLEET_FILE = "fleet.json"
FLEET_FORMAT = "reled-fleet/1"
GROUP = "local"  # every device of a fleet: `reled-edge deploy --group local`
REPLAY_SPEED = 10.0  # --replay: signal seconds per wall second, so a 10-decision probation takes ~10 s
PROBATION_DECISIONS = 10
STOP_SECONDS = 20.0  # SIGTERM, then SIGKILL after this long
START_SECONDS = 60.0  # a daemon or the collector that has not reported by then failed to start
DEPLOY_SECONDS = 600.0  # the whole deploy (`deploy --timeout` bounds the time without progress: 120 s)
READY = frozenset({"STAGED", "PROBATION", "COMMITTED"})  # --hil: the model waits for the simulation's decisions


@dataclass(frozen=True)
class UpRequest:
    """What `reled-edge fleet up` was asked for."""

    model: Path
    folder: Path
    scenario: str | None = None  # checked against the model's
    devices: int | None = None  # None: one per light of the model
    hil: bool = True  # devices driven by `reled hil run`; False: synthetic replay, 10x real time
    collect: bool = True
    netns: bool = False  # every device in a network namespace of its own, behind a veth pair
    netem: str | None = None  # a netem spec for each of those links (implies netns)
    deploy: bool = True
    latency_budget_ms: float = 5.0  # a decision slower than this is a policy failure (the device file's default)
    recordings: Path | None = None  # --replay: `reled record`'s folder (LIGHT.npz each); None: synthetic readings


def read_record(folder: Path) -> dict[str, Any] | None:
    """``FOLDER/fleet.json``, or None when there is none."""
    path = folder / FLEET_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RELEDError(f"{path} is unreadable ({exc}): remove it once no fleet runs from {folder}") from exc
    if not isinstance(record, dict) or record.get("format") != FLEET_FORMAT:
        raise RELEDError(f"{path} is not a {FLEET_FORMAT} file: remove it once no fleet runs from {folder}")
    return record


def save_record(folder: Path, record: dict[str, Any]) -> None:
    atomic_write_text(folder / FLEET_FILE, json.dumps(record, indent=2) + "\n")


def _ours(pid: Any, needle: str) -> bool:
    """Whether ``pid`` runs and one of its arguments is ``needle`` (its device file, the fleet's rollouts or
    devices folder: absolute paths, as they were started)."""
    argv = command_line(pid) if isinstance(pid, int) and pid > 0 else None
    return bool(argv) and needle in argv


def fleet_processes(record: dict[str, Any], folder: Path) -> dict[str, tuple[int, str]]:
    """What ``record`` started and still runs: name -> (pid, what its command line must name)."""
    wanted = {device: (entry.get("pid"), str(folder / entry.get("config", ""))) for device, entry in
              (record.get("devices") or {}).items()}
    for name, needle in (("collector", folder / "rollouts"), ("deploy", folder / "devices")):
        if isinstance(record.get(name), dict):
            wanted[name] = (record[name].get("pid"), str(needle))
    return {name: (pid, needle) for name, (pid, needle) in wanted.items() if _ours(pid, needle)}


def stop_processes(processes: dict[str, tuple[int, str]], timeout: float = STOP_SECONDS) -> None:
    """SIGTERM each, SIGKILL those still running after ``timeout``; returns once all are gone."""
    def running() -> list[int]:
        for pid, _ in processes.values():
            with contextlib.suppress(ChildProcessError):  # ours: reap it, so it does not linger as a zombie
                os.waitpid(pid, os.WNOHANG)
        return [pid for pid, needle in processes.values() if _ours(pid, needle)]

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        for pid in running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not running():
            return


def teardown(record: dict[str, Any], folder: Path) -> list[str]:
    """Stop everything ``record`` names (the daemons, then the collector and a deploy still serving, then the
    broker; what a daemon has not sent waits in its outbox), remove the namespaces, mark the record stopped.
    Returns what was stopped."""
    running = fleet_processes(record, folder)
    devices = {name: p for name, p in running.items() if name in (record.get("devices") or {})}
    others = {name: p for name, p in running.items() if name not in devices}
    stop_processes(devices)
    stop_processes(others)
    done = [f"{len(devices)} daemon{'s' * (len(devices) != 1)}"] if devices else []
    done += [f"the {name}" for name in others]
    if broker.running_pid(folder / "broker") is not None:
        broker.stop(folder / "broker")
        done.append("the broker")
    removed = [entry["netns"] for entry in (record.get("devices") or {}).values()
               if entry.get("netns") and netns.delete(entry["netns"])]
    if removed:
        done.append(f"{len(removed)} network namespace{'s' * (len(removed) != 1)}")
    record.update(state="stopped", stopped=time.time())
    save_record(folder, record)
    return done


def down(folder: Path) -> str:
    """`reled-edge fleet down`: stop the fleet started from ``folder``; says what it stopped (or that nothing ran)."""
    folder = folder.resolve()
    record = read_record(folder)
    if record is None:
        if broker.running_pid(folder / "broker") is not None:  # a fleet from before fleet.json, or a bare broker
            return f"no {FLEET_FILE} in {folder}; {broker.stop(folder / 'broker')}"
        return f"no fleet in {folder}: nothing running"
    live = fleet_processes(record, folder)
    spaces = [e["netns"] for e in (record.get("devices") or {}).values() if e.get("netns") and netns.exists(e["netns"])]
    if not live and not spaces and broker.running_pid(folder / "broker") is None:
        if record.get("state") != "stopped":
            record.update(state="stopped", stopped=time.time())
            save_record(folder, record)
        return f"nothing running in {folder}"
    return f"stopped {', '.join(teardown(record, folder))} ({folder})"


def write_fleet_devices(fleet: LocalFleet, meta: PolicyMetadata, lights: list[str], hil: bool,
                        hosts: dict[str, str] | None = None, latency_budget_ms: float = 5.0,
                        recordings: Path | None = None) -> dict[str, str]:
    """One device file per light, ``devK`` for the K-th, timed as the policy was trained (``meta.timing``);
    ``hosts``: the broker address each device reaches (its namespace's link); ``recordings``: the folder of
    `reled record` whose LIGHT.npz each replays. Returns device -> light."""
    t = meta.timing
    devices = {}
    for k, light in enumerate(lights):
        device = f"dev{k}"
        runtime: dict[str, Any] = {"decision_seconds": t.decision_seconds}
        if not hil:  # with HIL the simulation drives time
            runtime["speed"] = REPLAY_SPEED
        sections: dict[str, dict[str, Any]] = {
            "signal": {"yellow": t.yellow, "all_red": t.all_red, "min_green": t.min_green, "max_green": t.max_green},
            "runtime": runtime, "probation": {"decisions": PROBATION_DECISIONS},
            "inference": {"latency_budget_ms": latency_budget_ms}}
        if hosts:
            sections["broker"] = {"host": hosts[device]}
        recording = recordings / recording_name(light) if recordings is not None else None
        fleet.write_device(device, light, meta.phase_tables[light], replay_seed=k, groups=(GROUP,), hil=hil,
                           recording=recording, **sections)
        devices[device] = light
    return devices


def _edge(fleet: LocalFleet, *args: str, timeout: float = 120) -> str:
    """`reled-edge ARGS` for this fleet; RELEDError with its own last words when it fails."""
    proc = fleet.edge(*args, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[-1]
        raise RELEDError(f"`reled-edge {args[0]} {args[1] if len(args) > 1 else ''}` failed: "
                         f"{last.removeprefix('error: ')}")
    return proc.stdout


def _log_tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1].removeprefix("error: ")
    return "no output"


class _Starter:
    """The steps of `fleet up`, each recorded in fleet.json as soon as it is taken."""

    def __init__(self, request: UpRequest, meta: PolicyMetadata, lights: list[str], progress: Any):
        self.request, self.meta, self.progress = request, meta, progress
        self.folder = request.folder
        self.fleet = LocalFleet(self.folder)
        self.devices = {f"dev{k}": light for k, light in enumerate(lights)}
        self.record: dict[str, Any] = {
            "format": FLEET_FORMAT, "state": "starting", "started": time.time(), "model": str(request.model),
            "scenario": meta.scenario, "hil": request.hil,
            "devices": {d: {"intersection": light, "pid": None, "config": f"devices/{d}.toml", "netns": None}
                        for d, light in self.devices.items()},
            "collector": None, "broker_pid": None, "netem": request.netem}
        self.spaces: dict[str, netns.Namespace] = {}
        self.observer: ServerLink | None = None
        self.collector_pid = 0
        self.registered = False

    def save(self) -> None:
        save_record(self.folder, self.record)

    def namespaces(self) -> None:
        for device, space in zip(self.devices, netns.plan(self.folder, list(self.devices)), strict=True):
            self.record["devices"][device]["netns"] = space.name
            self.save()  # before it exists: `fleet down` removes it even if we die now
            netns.create(space, self.request.netem)
            self.spaces[device] = space
        link = f"behind `netem {self.request.netem}` both ways" if self.request.netem else "on its own veth link"
        self.progress(f"{len(self.spaces)} network namespaces, each {link}")

    def broker(self) -> None:
        hosts = {d: s.host_address for d, s in self.spaces.items()}
        write_fleet_devices(self.fleet, self.meta, list(self.devices.values()), self.request.hil, hosts,
                            self.request.latency_budget_ms, self.request.recordings)
        _edge(self.fleet, "keys", "init", "--keys", str(self.fleet.keys), "--devices", str(self.fleet.devices))
        _edge(self.fleet, "broker", "start", "--keys", str(self.fleet.keys), "--dir", str(self.fleet.broker_dir),
              "--port", str(self.fleet.port), "--server-port", str(self.fleet.server_port),
              *(a for h in hosts.values() for a in ("--device-host", h)))
        self.record["broker_pid"] = self.fleet.broker_pid()
        self.save()
        from edge_runtime.fleet.collector import REGISTRATION_TOPIC

        self.observer = self.fleet.observer([REGISTRATION_TOPIC])
        self.progress(f"broker on 127.0.0.1:{self.fleet.port} (devices), {self.fleet.server_port} (fleet tools)")

    def pump(self) -> None:
        assert self.observer is not None
        self.observer.pump(0.05, on_message=self._on_message)

    def _on_message(self, message: Message) -> None:
        from edge_runtime.fleet.collector import REGISTRATION_TOPIC

        if message.topic == REGISTRATION_TOPIC and message.payload:
            with contextlib.suppress(ValueError, AttributeError):
                self.registered = self.registered or json.loads(message.payload).get("pid") == self.collector_pid

    def collector(self) -> None:
        out = self.folder / "rollouts"
        proc = self.fleet.edge_background("collect", "--out", str(out), log=self.folder / "collect.log")
        self.collector_pid = proc.pid
        self.record["collector"] = {"pid": proc.pid, "out": "rollouts"}
        self.save()
        deadline = time.monotonic() + START_SECONDS
        while not self.registered:
            if proc.poll() is not None:
                raise RELEDError(f"the collector exited ({_log_tail(self.folder / 'collect.log')})")
            if time.monotonic() > deadline:
                raise RELEDError(f"the collector did not register within {START_SECONDS:g} s "
                                 f"(see {self.folder / 'collect.log'})")
            self.pump()
        self.progress(f"collecting rollouts into {out}")

    def check_daemons(self) -> None:
        for device, proc in self.fleet.daemons.items():
            if proc.poll() is not None:
                raise RELEDError(f"daemon {device} exited with code {proc.returncode}: "
                                 f"{_log_tail(self.folder / f'{device}.daemon.log')}")

    def wait(self, done: Any, what: str, timeout: float) -> None:
        """Pump until ``done()``; RELEDError when a daemon exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not done():
            self.check_daemons()
            if time.monotonic() > deadline:
                raise RELEDError(f"timed out after {timeout:g} s waiting for {what}")
            self.pump()

    def daemons(self) -> None:
        started = time.time()
        for device in self.devices:
            space = self.spaces.get(device)
            proc = self.fleet.start_daemon(device, prefix=space.exec_prefix() if space else None)
            self.record["devices"][device]["pid"] = proc.pid
            self.save()
        assert self.observer is not None
        reported = self.observer.reported
        self.wait(lambda: all(reported.get(d, {}).get("ts", 0) >= started for d in self.devices),
                  "every controller's first report", START_SECONDS)
        self.progress(f"{len(self.devices)} controllers reporting")

    def deploy(self) -> None:
        """Deploy the model to every device: with --replay until each reports COMMITTED (the deploy command
        waits for that); with --hil until each has it staged (its probation needs the simulation's decisions)."""
        model, log_path = self.request.model, self.folder / "deploy.log"
        self.progress(f"deploying {model.name} to {len(self.devices)} controllers")
        proc = self.fleet.edge_background("deploy", "--group", GROUP, "--model", str(model), "--timeout", "120",
                                          log=log_path)
        self.record["deploy"] = {"pid": proc.pid, "log": log_path.name}
        self.save()
        sha = sha256_file(model)
        assert self.observer is not None
        reported = self.observer.reported

        def ready(device: str) -> bool:
            rep = reported.get(device, {})
            staged = (rep.get("job") or {}).get("sha256") == sha or (rep.get("active") or {}).get("sha256") == sha
            return staged and rep.get("state") in READY

        def done() -> bool:
            if proc.poll() is not None:
                if proc.returncode != 0:
                    raise RELEDError(f"deploy failed: {_log_tail(log_path)} (see {log_path})")
                return True
            return self.request.hil and all(ready(d) for d in self.devices)

        self.wait(done, "the deploy", DEPLOY_SECONDS)
        if proc.poll() is None:  # --hil: staged everywhere; the devices commit on their own
            stop_processes({"deploy": (proc.pid, str(self.fleet.devices))})
        self.record["deploy"] = None
        if not self.request.hil:
            self.wait(lambda: all(reported.get(d, {}).get("state") == "COMMITTED" for d in self.devices),
                      "the COMMITTED reports", 30)
        self.progress(f"{model.name} {'staged' if self.request.hil else 'committed'} on every controller")

    def states(self) -> dict[str, str]:
        reported = self.observer.reported if self.observer is not None else {}
        return {d: str(reported.get(d, {}).get("state", "?")) for d in self.devices}

    def close(self) -> None:
        for link in self.fleet.observers:
            with contextlib.suppress(Exception):
                link.close()


def up(request: UpRequest, progress: Any = log.info) -> tuple[dict[str, Any], dict[str, str]]:
    """`reled-edge fleet up`: keys, broker, one daemon per light of the model (each in a session of its own, so
    it outlives this process), the collector, the deploy; returns fleet.json's record and every device's
    reported state. Anything failing half-way stops everything started so far before the error is raised."""
    from edge_runtime.policy import OnnxPolicy

    folder, model = request.folder.resolve(), request.model.resolve()
    request = replace(request, folder=folder, model=model)
    if not model.is_file():
        raise RELEDError(f"--model {model} does not exist: export one with `reled export`")
    meta = OnnxPolicy(model).meta
    if request.scenario is not None and request.scenario != meta.scenario:
        raise RELEDError(f"{model.name} was exported for scenario {meta.scenario!r}, not {request.scenario!r}: "
                         f"export a policy for {request.scenario} or leave --scenario out")
    lights = list(meta.phase_tables)
    if request.devices is not None and not 1 <= request.devices <= len(lights):
        raise RELEDError(f"--devices {request.devices}: {model.name} drives {len(lights)} lights "
                         f"({', '.join(lights)}), one controller each")
    lights = lights[:request.devices or len(lights)]
    if request.recordings is not None:
        check_recordings(request, meta, lights)
    if request.netem is not None:
        request = replace(request, netns=True)
    if request.netns:
        netns.check_available(request.netem)
    previous = read_record(folder)
    if previous is not None:
        if live := fleet_processes(previous, folder):
            pids = ", ".join(str(pid) for pid, _ in live.values())
            raise RELEDError(f"a fleet is already running in {folder} (pids {pids}): run "
                             f"`reled-edge fleet down --dir {folder}` first")
        teardown(previous, folder)  # what a dead run left: its broker, its namespaces
    elif (pid := broker.running_pid(folder / "broker")) is not None:
        raise RELEDError(f"a broker from {folder / 'broker'} is running (pid {pid}): run "
                         f"`reled-edge fleet down --dir {folder}` first")
    starter = _Starter(request, meta, lights, progress)
    starter.save()
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`, systemd: clean up
    try:
        if request.netns:
            starter.namespaces()
        starter.broker()
        if request.collect:
            starter.collector()
        starter.daemons()
        if request.deploy:
            starter.deploy()
        starter.record["state"] = "running"
        starter.save()
        return starter.record, starter.states()
    except BaseException:
        starter.close()
        with contextlib.suppress(Exception):  # the first error is the one to report
            teardown(starter.record, folder)
        raise
    finally:
        starter.close()
        signal.signal(signal.SIGTERM, previous_handler)


def check_recordings(request: UpRequest, meta: PolicyMetadata, lights: list[str]) -> None:
    """Every light's recording is in --recordings and fits its program, before anything starts."""
    from edge_runtime.device.adapters import ReplaySensor

    folder = request.recordings
    assert folder is not None
    if request.hil:
        raise RELEDError("--recordings feeds the replay sensor: give --replay (with --hil the simulation is the "
                         "sensor)")
    missing = [light for light in lights if not (folder / recording_name(light)).is_file()]
    if missing:
        raise RELEDError(f"no recording of light(s) {', '.join(missing)} in {folder}: run `reled record --scenario "
                         f"{meta.scenario} --out {folder}`")
    for light in lights:
        greens = tuple(meta.phase_tables[light])
        ReplaySensor(folder / recording_name(light), len(greens), greens)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt from now on, as Ctrl-C does (`fleet up --foreground`: both stop the fleet)."""
    signal.signal(signal.SIGTERM, _interrupt)


def wait_for_stop() -> None:
    """Block until Ctrl-C, or SIGTERM after :func:`interrupt_on_sigterm`."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            signal.pause()
