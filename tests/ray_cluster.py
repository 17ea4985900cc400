"""A real Ray cluster on this machine for the tests: a head and more nodes, each its own `ray start` process.

Every node is `ray start --block` in a session of its own, with its own temp dir and free ports, so a test
can lose one node (SIGKILL its whole process tree: raylet, object store, agents, workers, their SUMOs, as
when a machine dies) while the head carries on. ``close`` stops every node it started (SIGTERM, then
SIGKILL after a grace) and fails the test if any of their processes is still there after a deadline.
`ray stop` is not used: it stops every Ray on the machine, not only this cluster's.

Ray replaces 127.0.0.1 (and localhost) by the host's routable address when a node joins, so the nodes
use another loopback address, 127.0.0.2 (Linux routes all of 127/8 to lo): nothing leaves the machine.
Token authentication is on (RAY_AUTH_MODE and RAY_AUTH_TOKEN, set for the whole session in conftest),
as on a real cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL (Ray's agents may take longer to stop)
GONE_TIMEOUT_S = 15.0
STARTED = "Ray runtime started"
IP = "127.0.0.2"
# a lost node is declared dead in 2 s instead of 14 s with Ray's defaults (measured here), so that a replacement
# actor is never placed on it (its actor is reported unavailable after ~2 s either way)
HEAD_SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
                      "health_check_timeout_ms": 300, "health_check_failure_threshold": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((IP, 0))
        return int(sock.getsockname()[1])


def _ports(*names: str) -> list[str]:
    return [arg for name in names for arg in (name, str(free_port()))]


@dataclass
class RayNode:
    """One `ray start --block` process and what it started."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    node_id: str = ""
    seen: set[psutil.Process] = field(default_factory=set)  # every process of its tree seen so far

    def tree(self) -> set[psutil.Process]:
        """The node's processes now (with the ones seen before: a worker outlives a killed raylet briefly)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            self.seen |= {root, *root.children(recursive=True)}
        return {p for p in self.seen if _running(p)}

    def log(self) -> str:
        return (self.temp_dir / "start.log").read_text(errors="replace")


class LocalRayCluster:
    """A head on 127.0.0.2 and nodes joining it; every process is stopped by ``close``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="reled-ray-"))  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        self.address = f"{IP}:{self.port}"
        self.nodes: list[RayNode] = []
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def start_head(self, num_cpus: int) -> RayNode:
        return self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "false",
                                    "--system-config", json.dumps(HEAD_SYSTEM_CONFIG),
                                    *_ports("--dashboard-port", "--ray-client-server-port")],
                           num_cpus, {})

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None) -> RayNode:
        return self._start(name, ["--address", self.address], num_cpus, resources or {})

    def _start(self, name: str, args: list[str], num_cpus: int, resources: dict[str, float]) -> RayNode:
        temp_dir = self.root / name
        temp_dir.mkdir()
        cmd = [RAY, "start", "--block", *args, "--node-ip-address", IP, "--num-cpus", str(num_cpus),
               "--resources", json.dumps(resources), "--object-store-memory", str(100 * 2**20),
               "--temp-dir", str(temp_dir), "--disable-usage-stats",
               *_ports("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                       "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")]
        with (temp_dir / "start.log").open("w") as out:
            process = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = RayNode(name, process, temp_dir)
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not node.node_id:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {name} did not start:\n{node.log()[-3000:]}")
            time.sleep(0.2)
            if STARTED in node.log():
                node.node_id = next((a.split("=", 1)[1] for p in node.tree() if p.name() == "raylet"
                                     for a in p.cmdline() if a.startswith("--node_id=")), "")
        return node

    def kill(self, node: RayNode) -> None:
        """Lose ``node`` as a machine is lost: SIGKILL every process of its tree at once."""
        self._signal(node.tree(), signal.SIGKILL)
        _, alive = psutil.wait_procs(list(node.seen), timeout=GONE_TIMEOUT_S)
        assert not alive, f"processes of Ray node {node.name} survived SIGKILL: {alive}"
        node.process.wait(timeout=GONE_TIMEOUT_S)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this cluster still running: from the nodes' trees or naming its temp dir."""
        found = {p for node in self.nodes for p in node.tree()}
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.root) in arg for arg in proc.info["cmdline"] or []) and _running(proc):
                found.add(proc)
        return sorted(found, key=lambda p: p.pid)

    def close(self) -> None:
        """Stop every node (workers first, the head last), then fail if anything of the cluster is left."""
        for node in reversed(self.nodes):
            self._signal(node.tree(), signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        self._signal(set(self.leftovers()), signal.SIGKILL)
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=GONE_TIMEOUT_S)
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"Ray processes left behind: {[(p.pid, p.name()) for p in left]}"
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _signal(processes: set[psutil.Process], sig: int) -> None:
        for proc in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
