"""Network namespaces for a local fleet: each controller behind a link of its own (`fleet up --netns`), which
can be impaired with netem (`fleet up --netem SPEC`).

A device gets a namespace ``reled-<tag>-<device>`` (``tag``: a hash of the fleet folder, so two fleets never
share a name) joined to this machine by a veth pair on a /30 of 10.77.0.0/16 that no interface here uses:
the host end (``.1``) is where the broker listens for it, the namespace end (``.2``) is the device's. The
netem SPEC is applied to both ends, so each direction gets it (``delay 20ms``: 40 ms round trip). Deleting
the namespace deletes the veth pair with it. Needs root and ``ip`` (and ``tc`` and a kernel with netem for
SPEC); nothing here falls back to running without.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import RELEDError

POOL = ipaddress.ip_network("10.77.0.0/16")
PREFIX = "reled-"


@dataclass(frozen=True)
class Namespace:
    name: str  # `ip netns` name
    host_if: str  # the veth end on this machine
    ns_if: str  # the veth end inside the namespace
    host_address: str  # the broker's address for this device
    ns_address: str

    def exec_prefix(self) -> list[str]:
        """Run a command inside the namespace (`ip netns exec` execs into it: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.name]


def fleet_tag(folder: Path) -> str:
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:6]


def _run(*command: str, netns: str | None = None) -> subprocess.CompletedProcess:
    """``command`` on this machine, or inside ``netns``."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=30)


def _must(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        why = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[0]
        raise RELEDError(f"{what} failed: {why}")


def check_available(netem: str | None) -> None:
    """Refuse, with the reason, where the namespaces (and ``netem``) cannot be made: not root, no `ip` or `tc`,
    no netem in the kernel, a spec tc refuses. Tried in a scratch namespace, so nothing is left behind."""
    option = "--netem" if netem is not None else "--netns"
    if os.geteuid() != 0:
        raise RELEDError(f"{option} needs root (network namespaces, veth pairs, tc): run as root or leave "
                         f"{option} out")
    missing = [tool for tool in ("ip", *(["tc"] if netem is not None else [])) if shutil.which(tool) is None]
    if missing:
        raise RELEDError(f"{option} needs {' and '.join(missing)} (apt-get install iproute2)")
    try:
        spec = shlex.split(netem or "")
    except ValueError as exc:
        raise RELEDError(f"--netem {netem!r} is not a netem spec ({exc})") from None
    if netem is not None and not spec:
        raise RELEDError("--netem needs a netem spec, e.g. --netem 'delay 20ms loss 1%'")
    scratch = f"{PREFIX}probe-{os.getpid()}"
    _must(_run("ip", "netns", "add", scratch), f"{option}: creating a network namespace (`ip netns add`)")
    try:
        if netem is not None:
            proc = _run("tc", "qdisc", "add", "dev", "lo", "root", "netem", *spec, netns=scratch)
            if "qdisc kind is unknown" in proc.stderr:
                raise RELEDError("--netem: this kernel has no netem qdisc (`modprobe sch_netem`, or a kernel built "
                                 "with CONFIG_NET_SCH_NETEM); --netns alone needs none")
            _must(proc, f"--netem {netem!r}: `tc qdisc add ... netem {netem}`")
    finally:
        _run("ip", "netns", "del", scratch)


def used_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of every address on this machine (so a new /30 collides with none)."""
    proc = _run("ip", "-o", "-4", "addr", "show")
    _must(proc, "ip addr show")
    return [ipaddress.ip_interface(line.split()[3]).network for line in proc.stdout.splitlines()
            if len(line.split()) > 3]


def plan(folder: Path, devices: list[str]) -> list[Namespace]:
    """A namespace, veth names and a free /30 for each device, in order."""
    tag, used = fleet_tag(folder), used_networks()
    free = (net for net in POOL.subnets(new_prefix=30) if not any(net.overlaps(u) for u in used))
    out = []
    for k, device in enumerate(devices):
        net = next(free, None)
        if net is None:
            raise RELEDError(f"no free /30 left in {POOL} for {device}'s link")
        host, ns = list(net.hosts())
        out.append(Namespace(f"{PREFIX}{tag}-{device}", f"rl{tag}h{k}", f"rl{tag}n{k}", str(host), str(ns)))
    return out


def create(ns: Namespace, netem: str | None) -> None:
    """The namespace, its veth pair with both addresses up, and netem on both ends (with ``netem``); on any
    failure nothing of it is left and RELEDError says which step failed and why."""
    spec = shlex.split(netem) if netem is not None else []
    steps: list[tuple[list[str], str | None]] = [
        (["ip", "netns", "add", ns.name], None),
        (["ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if, "netns", ns.name], None),
        (["ip", "addr", "add", f"{ns.host_address}/30", "dev", ns.host_if], None),
        (["ip", "link", "set", ns.host_if, "up"], None),
        (["ip", "addr", "add", f"{ns.ns_address}/30", "dev", ns.ns_if], ns.name),
        (["ip", "link", "set", ns.ns_if, "up"], ns.name),
        (["ip", "link", "set", "lo", "up"], ns.name),
    ]
    if spec:
        steps += [(["tc", "qdisc", "add", "dev", ns.host_if, "root", "netem", *spec], None),
                  (["tc", "qdisc", "add", "dev", ns.ns_if, "root", "netem", *spec], ns.name)]
    delete(ns)  # a namespace of this name can only be left by a dead run of this very folder
    try:
        for command, inside in steps:
            where = f" in {ns.name}" if inside else ""
            _must(_run(*command, netns=inside), f"`{shlex.join(command)}`{where}")
    except BaseException:
        delete(ns)
        raise


def exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def delete(ns: Namespace | str, host_if: str | None = None) -> bool:
    """Remove a namespace (its veth pair goes with it) and a host end left behind; True if there was one."""
    name = ns.name if isinstance(ns, Namespace) else ns
    host_if = ns.host_if if isinstance(ns, Namespace) else host_if
    had = exists(name)
    if had:
        _run("ip", "netns", "del", name)
    if host_if is not None and Path("/sys/class/net", host_if).exists():
        with contextlib.suppress(subprocess.SubprocessError):
            _run("ip", "link", "del", host_if)
    return had
