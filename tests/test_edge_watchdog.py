"""The controller speaks systemd's notify protocol: real daemon processes and a real NOTIFY_SOCKET.

The test binds the AF_UNIX datagram socket systemd would (a path in a temp folder, or the abstract ``@name``
form), starts a daemon with ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` as a ``Type=notify`` unit with
``WatchdogSec=`` does, and reads what arrives: READY=1, STATUS=..., periodic WATCHDOG=1, STOPPING=1. A stopped
process (SIGSTOP) and a live process whose decision loop hangs on its actuator (a FIFO nobody reads, as a stuck
cabinet driver would) both stop the pings for longer than the watchdog interval, which is what makes systemd
restart it; when they go on, the pings resume. Every wait has a deadline; daemons and brokers are stopped by the
fixtures, passed or failed.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import secrets
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from edge_runtime.device.notify import PINGS_PER_INTERVAL, Notifier, socket_address, watchdog_interval
from edge_runtime.fleet.local import LocalFleet

WATCHDOG_USEC = 2_000_000  # a 2 s WatchdogSec: pings every 0.5 s
WINDOW = 2 * WATCHDOG_USEC / 1e6  # silence this long is well past what systemd tolerates
GREENS = ["GGrr", "rrGG"]
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), named in the fcntl module only from Python 3.10 on some builds


class NotifySocket:
    """What systemd listens on: every datagram, with when it arrived and its fields."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}

    def pump(self, timeout: float) -> None:
        """Take in what arrives within ``timeout`` seconds (everything already queued, at least)."""
        self.sock.settimeout(timeout)
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
            self.sock.settimeout(0)

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, fields in self.messages if fields.get("WATCHDOG") == "1" and t >= since]

    def statuses(self) -> list[str]:
        return [fields["STATUS"] for _, fields in self.messages if "STATUS" in fields]

    def has(self, key: str) -> bool:
        return any(fields.get(key) == "1" for _, fields in self.messages)

    def wait(self, condition: Callable[[], object], timeout: float, what: str, also: Callable[[], None] = lambda: None,
             ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:g} s waiting for {what}; got {self.messages[-5:]}")
            also()
            self.pump(0.1)

    def silence(self, seconds: float, timeout: float, also: Callable[[], None] = lambda: None) -> float:
        """Wait until no ping has come for ``seconds``; returns how long the last silence lasted."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < seconds:
            if time.monotonic() > deadline:
                pytest.fail(f"the pings did not stop for {seconds:g} s within {timeout:g} s")
            also()
            before = len(self.pings())
            self.pump(0.1)
            if len(self.pings()) > before:
                quiet_since = time.monotonic()
        return time.monotonic() - quiet_since

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    """A bound notify socket: ``@name`` in the abstract namespace when the test is parametrized so, else a path."""
    abstract = getattr(request, "param", False)
    address = f"@reled-test-{secrets.token_hex(6)}" if abstract else str(tmp_path / "notify.sock")
    sock = NotifySocket(address)
    try:
        yield sock
    finally:
        sock.close()


def write_device(fleet: LocalFleet, **sections: dict) -> None:
    fleet.write_device("dev0", "X", GREENS, **{"runtime": {"decision_seconds": 1.0, "speed": 20.0}, **sections})
    fleet.init_keys()


def test_the_watchdog_interval_follows_systemd():
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, 42) == 10.0 / PINGS_PER_INTERVAL
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "42"}, 42) == 10.0 / PINGS_PER_INTERVAL
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, 42) is None  # another process's
    assert watchdog_interval({}, 42) is None and watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert socket_address("@x") == "\0x" and socket_address("/run/x") == "/run/x"
    assert socket_address("vsock:2:9") is None
    quiet = Notifier({})  # outside systemd: nothing to send to, nothing raised
    quiet.ready("s")
    quiet.watchdog()
    assert not quiet.send("STOPPING=1")


@pytest.mark.parametrize("notify_socket", [True], indirect=True, ids=["abstract"])
def test_a_stopped_daemon_stops_pinging_and_resumes_after_sigcont(local_fleet, notify_socket):
    write_device(local_fleet)
    daemon = local_fleet.start_daemon("dev0", env=notify_socket.env())
    notify_socket.wait(lambda: notify_socket.has("READY"), 60, "READY=1")
    assert notify_socket.statuses()[0] == "fixed-time plan driving X; no model; deploy IDLE"
    notify_socket.wait(lambda: len(notify_socket.pings()) >= 3, 30, "three WATCHDOG=1 pings")
    os.kill(daemon.pid, signal.SIGSTOP)
    notify_socket.wait(lambda: psutil.Process(daemon.pid).status() == psutil.STATUS_STOPPED, 10, "the stop")
    notify_socket.pump(0)  # what it sent before it stopped
    stopped = time.monotonic()
    notify_socket.wait(lambda: time.monotonic() - stopped >= WINDOW, WINDOW + 5, "the watchdog window")
    assert notify_socket.pings(since=stopped) == [], "a stopped process cannot ping"
    os.kill(daemon.pid, signal.SIGCONT)
    resumed = time.monotonic()
    notify_socket.wait(lambda: len(notify_socket.pings(since=resumed)) >= 2, 30, "the pings after SIGCONT")
    daemon.send_signal(signal.SIGTERM)
    notify_socket.wait(lambda: notify_socket.has("STOPPING"), 30, "STOPPING=1")
    assert daemon.wait(30) == 0


def test_a_hung_decision_loop_stops_the_pings_although_the_process_runs(local_fleet, notify_socket, tmp_path):
    """The actuator blocks (a FIFO nobody reads any more): the loop hangs, the MQTT thread lives on, and the
    pings stop, because they come from the loop and nowhere else."""
    heads = tmp_path / "heads.fifo"
    os.mkfifo(heads)
    reader = os.open(heads, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)  # the smallest pipe: it fills in seconds
    drained = [0]

    def drain() -> None:
        try:
            while chunk := os.read(reader, 65536):
                drained[0] += len(chunk)
        except BlockingIOError:
            pass

    try:
        write_device(local_fleet, actuator={"adapter": "log", "file": str(heads)},
                     runtime={"decision_seconds": 1.0, "speed": 200.0}, signal={"fallback_green": 10.0})
        daemon = local_fleet.start_daemon("dev0", env=notify_socket.env())
        notify_socket.wait(lambda: len(notify_socket.pings()) >= 3, 60, "three pings while the heads are read",
                           also=drain)
        assert drained[0] > 0
        quiet = notify_socket.silence(WINDOW, 120)  # nobody reads the heads now: the pipe fills, the loop blocks
        pending = struct.unpack("i", fcntl.ioctl(reader, termios.FIONREAD, b"\0" * 4))[0]
        assert pending > 4096 - 100, pending  # full, up to less than a line: the actuator's write is what blocks
        process = psutil.Process(daemon.pid)
        assert quiet >= WINDOW and process.status() in (psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP), \
            process.status()
        assert process.num_threads() > 1  # paho's network thread still runs: only the loop is stuck
        resumed = time.monotonic()
        notify_socket.wait(lambda: len(notify_socket.pings(since=resumed)) >= 2, 30, "the pings once the heads "
                           "are read again", also=drain)
        daemon.send_signal(signal.SIGTERM)
        notify_socket.wait(lambda: daemon.poll() is not None, 30, "the daemon's exit", also=drain)
        assert notify_socket.has("STOPPING")
    finally:
        os.close(reader)


@pytest.mark.slow
def test_status_tells_the_mode_model_and_deploy_state_through_a_deploy_and_a_rollback(local_fleet, notify_socket,
                                                                                      queue_policy):
    write_device(local_fleet, probation={"decisions": 3}, inference={"latency_budget_ms": 50.0})
    local_fleet.start_broker()
    daemon = local_fleet.start_daemon("dev0", env=notify_socket.env())
    notify_socket.wait(lambda: notify_socket.has("READY"), 60, "READY=1")
    model = queue_policy(local_fleet.root / "v1.onnx", version=1, tables={"X": GREENS}, scenario="test",
                         test_queue=np.tile(np.arange(1, 9, dtype=np.float32), (4, 1)), n_phases=2)
    proc = local_fleet.edge("deploy", "--device", "dev0", "--model", str(model), "--timeout", "60", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from edge_runtime.fileio import sha256_file

    sha = sha256_file(model)[:12]
    committed = f"policy driving X; policy v1 ({sha}); deploy COMMITTED"
    notify_socket.wait(lambda: committed in notify_socket.statuses(), 30, committed)
    seen = notify_socket.statuses()
    assert seen[0] == "fixed-time plan driving X; no model; deploy IDLE"
    assert any(s.endswith("deploy DOWNLOADING") for s in seen) and any(s.endswith("deploy PROBATION") for s in seen)
    assert all(a != b for a, b in itertools.pairwise(seen))  # sent on change only
    proc = local_fleet.edge("rollback", "--device", "dev0", "--timeout", "60", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rolled = "fixed-time plan driving X; no model; deploy ROLLED_BACK"
    notify_socket.wait(lambda: rolled in notify_socket.statuses(), 30, rolled)
    daemon.send_signal(signal.SIGTERM)
    notify_socket.wait(lambda: notify_socket.has("STOPPING"), 30, "STOPPING=1")
