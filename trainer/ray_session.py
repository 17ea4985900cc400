"""Ray when a command asks for it: the optional extra, one connection, and the same code on every node.

Ray is an optional extra (`pip install 'reled[ray]'`), imported only by the commands that use it.
An address is Ray's own: ``local`` starts a private Ray on this machine that ends with the command,
``auto`` joins the cluster this machine was added to (`ray start`), ``HOST:PORT`` is a cluster's head.
Actors and tasks on other nodes import the `reled` installed there, and an episode is only reproducible
with the same code, so each one reports ``code_identity()`` and the driver refuses a node that differs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import signal
import socket
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_runtime import __version__
from edge_runtime.errors import RELEDError

log = logging.getLogger(__name__)
RAY_EXTRA = "pip install 'reled[ray]'"
LOCAL = "local"  # the address that starts a private Ray on this machine
# a private Ray's shared memory: episodes and weights are a few MB (Ray's default takes 30% of the RAM)
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20
PACKAGES = ("trainer", "edge_runtime")
CONNECT_TIMEOUT_S = 5.0


def ray_installed() -> bool:
    """Whether the extra is there (checked before a run folder is written, without importing Ray)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except ValueError:  # a `ray` module without a spec: not an installation
        return False


def missing_ray(what: str) -> RELEDError:
    return RELEDError(f"{what} needs Ray, an optional extra: {RAY_EXTRA}")


def import_ray(what: str) -> ModuleType:
    """``ray``, or the one-line error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise missing_ray(what) from None
    return ray


def code_identity() -> str:
    """This installation's version and a digest of its Python sources (what an episode's result depends on)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        root = Path(str(importlib.import_module(package).__file__)).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def check_same_code(node: str, node_identity: str, driver_identity: str) -> None:
    """Refuse a node whose `reled` differs from the driver's."""
    if node_identity != driver_identity:
        raise RELEDError(f"Ray node {node} runs reled {node_identity}, the driver {driver_identity}: install the "
                         "same reled on every node, or submit the command with `ray job submit --working-dir .` "
                         "(docs/scale_out.md)")


def check_address(address: str) -> None:
    """Refuse a HOST:PORT where nothing listens, at once: Ray itself retries a missing head for minutes."""
    if address in (LOCAL, "auto"):
        return  # a private Ray is started; "auto" finds the local cluster or fails at once
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RELEDError(f"--ray-address {address!r} is not local, auto or HOST:PORT (a Ray head's address)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RELEDError(f"--ray-address {address}: no Ray head answers there ({exc}); start one with "
                         "`ray start --head --port PORT`, use auto on a node of the cluster, or local") from None


def first_line(exc: BaseException) -> str:
    """The headline of one of Ray's exceptions (they carry tracebacks and hints on the lines below)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def node_id() -> str:
    """The Ray node this process runs on (inside an actor or a task)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


class RaySession:
    """This process's connection to Ray for one command; closed with it when the command opened it."""

    def __init__(self, address: str, what: str, num_cpus: int | None = None):
        self.ray = import_ray(what)
        self.address = address
        self.owned = not self.ray.is_initialized()  # a caller (a test, a Ray job) may have connected already
        if not self.owned:
            return
        check_address(address)
        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address == LOCAL:
            options |= {"num_cpus": num_cpus, "include_dashboard": False,
                        "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
        main_thread = threading.current_thread() is threading.main_thread()
        on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
        try:
            self.ray.init(address=address, **options)
        except (ConnectionError, TimeoutError, ValueError) as exc:
            raise RELEDError(f"cannot reach Ray at --ray-address {address} ({exc}); start the cluster with "
                             "`ray start --head`, or use --ray-address local for a private Ray on this machine"
                             ) from None
        finally:
            if on_sigterm is not None:  # ray.init makes SIGTERM a bare sys.exit; `kill` stops a run as Ctrl-C does
                signal.signal(signal.SIGTERM, on_sigterm)
        log.info("Ray at %s: %s", address, self.ray.cluster_resources())

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
