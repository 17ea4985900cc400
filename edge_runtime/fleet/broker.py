"""A real Mosquitto for the fleet: generated config, two kinds of listener, per-device users, topic ACLs, TLS.

``start`` writes everything into one folder (config, password files, ACLs, TLS certificate, persistence,
log, pid) and returns once the broker accepts connections; ``stop`` ends it. With
``per_listener_settings`` every listener has its own users and ACL:

- device listeners (plain ``--port`` unless ``--tls-only``, TLS ``--tls-port``): only device users, each
  connected under its own user name as client id (so no device can take over another's session) and
  limited by the device ACL to its own leaves;
- the server listener (``--server-port``, TLS whenever ``--tls-port`` is given): only ``reled-server``,
  which reads and writes the whole tree. A device cannot even log in there.

A broker started with a :class:`~edge_runtime.fleet.bridge.Bridge` is a site broker: the same listeners, plus
Mosquitto's bridge to the central broker. A broker started without one is a central broker: its device
listeners also accept every site in the key folder (``reled-bridge-<site>``, with the bridge ACL of
:func:`~edge_runtime.fleet.bridge.central_acl`).

Mosquitto runs in the folder and the config names files relative to it, so the folder's parents need not
be open to the broker. Started as root, Mosquitto drops to the ``mosquitto`` user before it reads its
password files, ACLs and TLS key, so the folder and what it holds belong to that user (0700/0600); the
key folder stays the operator's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_path, atomic_write_text
from edge_runtime.fleet.bridge import CA_FILE, Bridge, central_acl, config_lines
from edge_runtime.keys import KeyFolder
from edge_runtime.protocol import FROM_DEVICE, PACKET_LIMIT, ROOT, SERVER_USER, TO_DEVICE, bridge_user, device_topic

STATE_FILE = "broker.json"
CONFIG_FILE = "mosquitto.conf"
BROKER_USER = "mosquitto"  # what Mosquitto switches to when started as root
DEVICE_PASSWD, DEVICE_ACL = "passwd-devices", "acl-devices"
SERVER_PASSWD, SERVER_ACL = "passwd-server", "acl-server"
TLS_FILES = ("server.crt", "server.key")  # copied from KEYS/tls for the broker's user
WRITTEN_BY_BROKER = ("mosquitto.db", "mosquitto.log", "mosquitto.pid")
PBKDF2_ROUNDS = 101  # mosquitto_passwd's default; the passwords are 192 random bits, stretching adds nothing
MIB = 1024 * 1024
# Bounds on what clients can make the broker hold (docs/edge.md, "Limits"). Mosquitto 2.0 has no cap on the
# number of retained messages: the device ACL bounds them (a device can retain only on its few leaves, each
# message under max_packet_size).
LIMITS = {
    "max_packet_size": PACKET_LIMIT,  # a rollout batch + headers; a larger packet disconnects its sender
    "max_inflight_messages": 64,  # per client, QoS 1 messages sent and not yet acknowledged
    "max_inflight_bytes": 16 * MIB,
    "max_queued_messages": 10_000,  # per client beyond those in flight (Mosquitto's 1,000 drops silently)
    "max_queued_bytes": 64 * MIB,  # a stalled collector or device cannot grow the broker past this
    "memory_limit": 1024 * MIB,  # the whole broker: past it the client whose message needs memory is dropped
}
# What a device may do in its own subtree (reled/v1/dev/<user name>/...): it never writes what the server
# tells it (the signed `desired`, rollout acks, HIL observations), so it can neither overwrite nor erase them.
DEVICE_READ = TO_DEVICE
DEVICE_READWRITE = ("reported",)  # reading back its own retained report is harmless
DEVICE_WRITE = tuple(leaf for leaf in FROM_DEVICE if leaf not in DEVICE_READWRITE)


@dataclass(frozen=True)
class BrokerInfo:
    """How clients reach the broker (written by ``start``, read by deploy/status/collect)."""

    host: str
    port: int | None  # plain MQTT for devices; None with --tls-only
    server_port: int  # the fleet tools' listener (TLS when tls_port is set)
    pid: int = 0
    tls_port: int | None = None  # TLS for devices
    ca_file: str | None = None  # absolute, so the tools work from any directory
    device_hosts: tuple[str, ...] = ()  # more addresses the device listeners bind to (a fleet's veth ends)
    site: str | None = None  # a site broker: the site's name
    bridge_to: str | None = None  # and the central broker it is bridged to (HOST:PORT)

    @classmethod
    def read(cls, folder: Path) -> BrokerInfo:
        path = folder / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise RELEDError(f"no broker state in {folder}: run `reled-edge broker start` or give --host/--port") \
                from exc
        except (ValueError, TypeError) as exc:
            raise RELEDError(f"{path} is damaged ({exc}): stop the broker and start it again") from exc

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.port, self.tls_port, self.server_port) if p is not None]


def acl_text(sites: list[str] = ()) -> str:
    """The device listeners' ACL (``%u``: the connected device's user name); ``sites``: the site brokers whose
    bridges log in here (a central broker)."""
    rules = [*(("read", leaf) for leaf in DEVICE_READ), *(("write", leaf) for leaf in DEVICE_WRITE),
             *(("readwrite", leaf) for leaf in DEVICE_READWRITE)]
    return ("# generated by reled-edge: a device reads what the server tells it and writes what it reports,\n"
            "# in its own subtree only, and reads model chunks\n"
            + "".join(f"pattern {access} {device_topic('%u', leaf)}\n" for access, leaf in rules)
            + f"pattern read {ROOT}/models/#\n" + central_acl(sites))


def server_acl_text() -> str:
    """The server listener's ACL: the fleet tools read and write the whole tree."""
    return f"# generated by reled-edge\nuser {SERVER_USER}\ntopic readwrite {ROOT}/#\n"


def config_text(info: BrokerInfo, bridge: list[str] = ()) -> str:
    """The mosquitto.conf that ``start`` uses (firmware_configs/mosquitto/ holds a rendered example); ``bridge``:
    a site broker's connection section (:func:`edge_runtime.fleet.bridge.config_lines`)."""
    tls = [f"certfile {TLS_FILES[0]}", f"keyfile {TLS_FILES[1]}", "tls_version tlsv1.2"]
    device = ["allow_anonymous false", "use_username_as_clientid true", f"password_file {DEVICE_PASSWD}",
              f"acl_file {DEVICE_ACL}"]
    lines = [
        "# generated by `reled-edge broker start`; edit the template in edge_runtime/fleet/broker.py, not this file.",
        "# Paths are relative to this folder: Mosquitto runs in it.",
        f"user {BROKER_USER}",
        "per_listener_settings true",
        "persistence true",
        "persistence_location ./",
        "autosave_interval 5",
        "pid_file mosquitto.pid",
        "log_dest file mosquitto.log",
        "log_type error", "log_type warning", "log_type notice",
        "connection_messages true",
        "set_tcp_nodelay true",  # else Nagle holds a second small message for the first's delayed ACK (40 ms)
        *(f"{name} {value}" for name, value in LIMITS.items()),
    ]
    for host in (info.host, *info.device_hosts):  # the same listener settings on each address
        also = f", also on {host}" if host != info.host else ""
        if info.port is not None:
            lines += ["", f"# devices, plain MQTT{also}", f"listener {info.port} {host}", *device]
        if info.tls_port is not None:
            lines += ["", f"# devices, TLS{also}", f"listener {info.tls_port} {host}", *device, *tls]
    lines += ["", f"# the fleet tools ({SERVER_USER} only)", f"listener {info.server_port} {info.host}",
              "allow_anonymous false", f"password_file {SERVER_PASSWD}", f"acl_file {SERVER_ACL}",
              *(tls if info.tls_port is not None else []), *bridge]
    return "\n".join(lines) + "\n"


def password_line(user: str, password: str) -> str:
    """``user:$7$...``, Mosquitto 2's PBKDF2-SHA512 hash, made here: `mosquitto_passwd -U` would first copy
    the plain passwords into a world-readable temp file."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ROUNDS)
    return f"{user}:$7${PBKDF2_ROUNDS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def tls_names(host: str, names: list[str]) -> list[str]:
    """What the server certificate is valid for: the operator's names first (the first one is its common
    name), then the listen address unless it is a wildcard, then localhost."""
    wanted = [*names, host, "localhost"]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_unspecified:
            wanted.remove(host)
    return list(dict.fromkeys(wanted))


def _owner() -> tuple[int, int] | None:
    """(uid, gid) the broker will run as when that is not us: started as root, Mosquitto drops to its user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError as exc:
        raise RELEDError(f"started as root, Mosquitto would run as the '{BROKER_USER}' user, which does not exist: "
                         "create it (the Debian package does) or start the broker as an ordinary user") from exc
    return entry.pw_uid, entry.pw_gid


def _install(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    """A file only the broker may read: 0600 and owned by its user before the first byte is written."""
    with atomic_path(path, mode=0o600) as tmp:
        if owner is not None:
            os.chown(tmp, *owner)
        tmp.write_bytes(data)


def last_log_line(folder: Path) -> str:
    """The broker's last words (what it says about a listener that failed, or its bridge)."""
    with contextlib.suppress(OSError):
        if lines := (folder / "mosquitto.log").read_text(errors="replace").strip().splitlines():
            return lines[-1]
    return "no log"


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def command_line(pid: int) -> list[str] | None:
    """The process's arguments, or None when there is no such process (a zombie has none either)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] or None


def _is_ours(argv: list[str] | None, folder: Path) -> bool:
    """Whether a command line is the Mosquitto ``start`` launched from ``folder``."""
    return bool(argv) and Path(argv[0]).name == "mosquitto" and str(folder / CONFIG_FILE) in argv


def _recorded_pid(folder: Path) -> int | None:
    """The pid in ``broker.json``, read on its own: a state file an older version wrote can still be stopped."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return int(json.loads((folder / STATE_FILE).read_text())["pid"])
    return None


def running_pid(folder: Path) -> int | None:
    """The pid of the broker started from ``folder``, if it still runs (a reused pid is not it)."""
    pid = _recorded_pid(folder)
    return pid if pid and _is_ours(command_line(pid), folder.resolve()) else None


def start(folder: Path, keys: KeyFolder, host: str = "127.0.0.1", port: int = 1883, tls_port: int | None = None,
          server_port: int | None = None, tls_only: bool = False, names: list[str] | None = None,
          timeout: float = 10.0, device_hosts: list[str] | None = None, bridge: Bridge | None = None) -> BrokerInfo:
    """Start Mosquitto for every user in ``keys``; raises with the broker's own words when it fails.

    ``server_port`` defaults to the device TLS port + 1 with TLS (8884), else the plain port + 1 (1884);
    ``tls_only`` opens no plain device listener; ``names`` are the server certificate's extra names;
    ``device_hosts`` are more addresses the device listeners (not the tools') listen on; ``bridge``: a site
    broker, bridged to the central one (without it, the broker accepts the key folder's sites' bridges)."""
    folder = folder.resolve()
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        raise RELEDError("mosquitto is not installed: `sudo apt-get install mosquitto` (make install does it)")
    if tls_only and tls_port is None:
        raise RELEDError("--tls-only needs --tls-port: without it no device could connect")
    if (pid := running_pid(folder)) is not None:
        raise RELEDError(f"a broker from {folder} is already running (pid {pid}): `reled-edge broker stop` first")
    if SERVER_USER not in keys.users():
        raise RELEDError(f"no credentials in {keys.root}: run `reled-edge keys init --keys {keys.root} --device ID`")
    if bridge is not None and not keys.secret_path(bridge_user(bridge.site)).exists():
        raise RELEDError(f"no bridge credentials for site {bridge.site} in {keys.root}: run `reled-edge keys init "
                         f"--keys {keys.root} --site {bridge.site}` on the central broker's key folder, restart the "
                         f"central broker, and give this broker that folder's {bridge_user(bridge.site)}.secret")
    info = BrokerInfo(host=host, port=None if tls_only else port,
                      server_port=server_port or (tls_port if tls_port is not None else port) + 1, tls_port=tls_port,
                      device_hosts=tuple(dict.fromkeys(h for h in device_hosts or [] if h != host)),
                      site=bridge.site if bridge else None, bridge_to=bridge.address if bridge else None)
    if len(set(info.ports)) < len(info.ports):
        raise RELEDError(f"the listeners need different ports (got {', '.join(map(str, info.ports))})")
    bound = [(host, p) for p in info.ports] + [(h, p) for h in info.device_hosts for p in (info.port, info.tls_port)
                                               if p is not None]
    for address, listener in bound:
        if _port_open(address, listener):
            raise RELEDError(f"{address}:{listener} is already in use: choose other ports")
    owner = _owner()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    log_path = folder / "mosquitto.log"
    log_path.touch(mode=0o600)
    for path in [folder, *(folder / name for name in WRITTEN_BY_BROKER)]:
        if owner is not None and path.exists():
            os.chown(path, *owner)
    sites = keys.sites() if bridge is None else []  # a central broker accepts the sites' bridges
    device_users = [*keys.devices(), *(bridge_user(site) for site in sites)]
    section = config_lines(bridge, keys.password(bridge_user(bridge.site))) if bridge is not None else []
    for name, text in ((DEVICE_PASSWD, "".join(password_line(u, keys.password(u)) for u in device_users)),
                       (SERVER_PASSWD, password_line(SERVER_USER, keys.password(SERVER_USER))),
                       (DEVICE_ACL, acl_text(sites)), (SERVER_ACL, server_acl_text()),
                       (CONFIG_FILE, config_text(info, section))):
        _install(folder / name, text.encode(), owner)
    if bridge is not None and bridge.ca_file is not None:
        _install(folder / CA_FILE, bridge.ca_file.read_bytes(), owner)
    if tls_port is not None:
        ca_file = keys.ensure_tls(tls_names(host, [*(names or []), *info.device_hosts])).resolve()
        info = replace(info, ca_file=str(ca_file))
        for name in TLS_FILES:
            _install(folder / name, (keys.tls_dir / name).read_bytes(), owner)
    with log_path.open("ab") as log_file:  # its startup errors, before it opens the log itself
        process = subprocess.Popen([binary, "-c", str(folder / CONFIG_FILE)], cwd=folder, stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not all(_port_open(address, listener) for address, listener in bound):
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise RELEDError(f"mosquitto did not start on {', '.join(f'{a}:{p}' for a, p in bound)}: "
                             f"{last_log_line(folder)}")
        time.sleep(0.05)
    info = replace(info, pid=process.pid)
    atomic_write_text(folder / STATE_FILE, json.dumps(asdict(info), indent=2) + "\n")
    return info


def stop(folder: Path, timeout: float = 10.0) -> str:
    """Stop the broker started from ``folder`` and say what happened. A recorded pid that is no longer this
    folder's Mosquitto (it exited and the pid was reused) is never signalled: the stale state is removed."""
    folder = folder.resolve()
    pid = _recorded_pid(folder)
    if pid is None:
        return "no broker was running"
    argv = command_line(pid)
    if not _is_ours(argv, folder):
        (folder / STATE_FILE).unlink(missing_ok=True)
        (folder / "mosquitto.pid").unlink(missing_ok=True)
        now = f"pid {pid} is now {' '.join(argv)[:80]!r}, left alone" if argv else f"pid {pid} has exited"
        return f"no broker was running ({now}); removed the stale {folder / STATE_FILE}"
    os.kill(pid, signal.SIGTERM)  # Mosquitto saves its persistence file on SIGTERM
    deadline = time.monotonic() + timeout
    while _is_ours(command_line(pid), folder) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if _is_ours(command_line(pid), folder):
        os.kill(pid, signal.SIGKILL)
    return f"stopped mosquitto (pid {pid})"
