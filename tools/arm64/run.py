#!/usr/bin/env python3
"""`make test-arm64`: the controller on arm64, emulated on this x86 machine.

Why: the daemon had only ever run on x86-64, and controllers are Raspberry Pis and Jetsons. A Debian
bookworm arm64 root (what Raspberry Pi OS Bookworm 64-bit is built from: the same Python 3.11 and glibc
2.36) runs through qemu-user-static, registered with binfmt_misc, so the controller's real code, wheels
and ONNX Runtime kernels run as aarch64 code; the broker and the fleet tools stay on this machine and
reach it over loopback, as they would reach a cabinet.

1. root: debootstrap --arch=arm64 --variant=minbase (python3, python3-venv) from the Debian mirror this
   machine's apt uses, built once under --root and kept (rebuilt when missing or half-built).
2. wheelhouse: the edge extra's aarch64 CPython 3.11 wheels, downloaded here (pip inside the root does not
   trust this machine's package proxy), cached per pyproject.toml.
3. install: `pip install --no-index --find-links WHEELHOUSE '.[edge]'` in a venv inside the root.
4. self-test: a cologne8 policy exported here by the trainer replays its exporter's self-test inside the
   root (the check a controller's shadow test runs), and times its decisions there.
5. fleet: `reled-edge broker start` here, the daemon in the root (replay sensor, log actuator), `reled-edge
   deploy` of v1 until COMMITTED, --decisions decisions with it, a deploy of v2 until COMMITTED, then
   `reled-edge rollback` (back to v1).
6. parity: every observation the arm64 daemon decided with v1 (from its outbox) decided again by ONNX
   Runtime here: the actions must be identical; the logits of both are compared.

/proc and /sys are mounted in the root (ONNX Runtime reads the CPU list) with the work folder, and always
unmounted at the end. Not root, no qemu-user-static or binfmt_misc: one line `skipped: ...`, exit 0.

    sudo .venv/bin/python tools/arm64/run.py --json out/arm64.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tools" / "platforms")]

from wheels import PLATFORMS, build_wheel, last_line  # noqa: E402

from edge_runtime.errors import RELEDError  # noqa: E402
from edge_runtime.fileio import atomic_write_text  # noqa: E402
from edge_runtime.fleet.local import LocalFleet, wait_for  # noqa: E402
from edge_runtime.fleet.server import Model  # noqa: E402
from edge_runtime.policy import OnnxPolicy  # noqa: E402
from edge_runtime.rollouts import SOURCE_POLICY  # noqa: E402

CACHE = Path("/var/cache/reled-arm64")
MARKER = ".reled-root.json"  # written last by the build: a root without it is half-built
VENV = "/opt/reled/venv"  # inside the root
WHEELHOUSE = "/opt/reled/wheelhouse"
SOURCE = "/opt/reled/src"
PI = PLATFORMS[0]  # Raspberry Pi OS Bookworm 64-bit: Python 3.11, aarch64, glibc 2.36
# The emulated CPU is a Raspberry Pi 4's Cortex-A72 (ARMv8.0: NEON, no dot product), the oldest core the
# controller targets, so ONNX Runtime picks the kernels a Pi 4 runs; qemu-user would stop on anything newer.
QEMU_CPU = "cortex-a72"
# What runs in the root gets none of this machine's settings (its pip proxy and find-links above all).
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
             "LANG": "C.UTF-8", "QEMU_CPU": QEMU_CPU}
CPUINFO = "/opt/reled/cpuinfo"  # in the root: mounted over its /proc/cpuinfo
DEVICE = "arm0"


class Skip(Exception):
    """This machine cannot run the arm64 root; the message says why."""


def run(command: list[str], timeout: float = 1800, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        said = last_line(proc.stderr + proc.stdout)
        raise RELEDError(f"{' '.join(command[:4])} ... failed ({proc.returncode}): {said}")
    return proc


def in_root(root: Path, *command: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return run(["chroot", str(root), *command], timeout=timeout, env=CLEAN_ENV)


# --- the machine --------------------------------------------------------------------------------------------------
def check_machine() -> None:
    """Root, debootstrap, qemu-user-static and an aarch64 binfmt handler (registered here when missing)."""
    if os.geteuid() != 0:
        raise Skip("not root (chroot, mount and binfmt_misc need it): run it with sudo")
    for tool in ("debootstrap", "qemu-aarch64-static", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} is missing: apt-get install debootstrap qemu-user-static binfmt-support")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True)
    if not (binfmt / "status").exists():
        raise Skip("binfmt_misc cannot be mounted here (a container without that privilege?)")
    entry = binfmt / "qemu-aarch64"
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise Skip("no aarch64 handler in binfmt_misc and it could not be registered (update-binfmts --enable "
                   "qemu-aarch64)")


def debian_mirror() -> list[str]:
    """The Debian mirror this machine's apt uses (the one known to answer here), as debootstrap's last argument;
    none found: debootstrap's own default."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        text = path.read_text() if path.is_file() else ""
        match = re.search(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?\s", text + "\n", re.MULTILINE)
        if match:
            return [match.group(1)]
    return []


# --- mounts -------------------------------------------------------------------------------------------------------
def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path.resolve())
    points = [Path(line.split()[1].replace("\\040", " ")) for line in Path("/proc/mounts").read_text().splitlines()]
    return sorted((p for p in points if str(p) == prefix or str(p).startswith(prefix + "/")),
                  key=lambda p: len(str(p)), reverse=True)


def unmount_all(path: Path) -> None:
    """Unmount everything below ``path`` (lazily when busy); a folder with a mount left is never deleted."""
    for point in mounts_under(path):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
    if mounts_under(path):
        raise RELEDError(f"{path}: could not unmount {mounts_under(path)[0]}; unmount it by hand")


def remove_tree(path: Path) -> None:
    unmount_all(path)  # never rm -rf through a bind mount of /proc, /sys or a host folder
    shutil.rmtree(path, ignore_errors=True)


def remove_half_built(path: Path) -> None:
    """Remove what a killed or failed build left at ``path``: only an empty folder or one debootstrap made (its
    ``debootstrap/`` work folder or a root's ``usr/``), never a folder --root names by mistake."""
    if path.exists() and any(path.iterdir()) and not ((path / "debootstrap").is_dir() or (path / "usr").is_dir()):
        raise RELEDError(f"{path} exists and is not a root this tool built: choose another --root or remove it")
    remove_tree(path)


def pi4_cpuinfo() -> str:
    """A Raspberry Pi 4's /proc/cpuinfo with this machine's CPU count. qemu-user 7.2 (Debian 12) shows the aarch64
    program the host's x86 /proc/cpuinfo, which ONNX Runtime 1.32's cpuinfo library crashes on (SIGSEGV at import;
    1.23 only warned); on a real Pi the kernel writes this."""
    core = ("BogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
            "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n")
    return "".join(f"processor\t: {i}\n{core}\n" for i in range(os.cpu_count() or 1)) + \
        "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B (emulated)\n"


@contextlib.contextmanager
def mounted(root: Path, binds: dict[Path, Path]) -> Iterator[None]:
    """/proc (with a Pi 4's cpuinfo) and /sys in the root, and each host folder of ``binds`` at its path there;
    unmounted at the end, whatever happened."""
    cpuinfo = root / CPUINFO.lstrip("/")
    cpuinfo.parent.mkdir(parents=True, exist_ok=True)
    cpuinfo.write_text(pi4_cpuinfo())
    try:
        for kind, name in (("proc", "proc"), ("sysfs", "sys")):
            run(["mount", "-t", kind, kind, str(root / name)])
        run(["mount", "--bind", str(cpuinfo), str(root / "proc/cpuinfo")])
        for host, inside in binds.items():
            target = root / str(inside).lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", "--bind", str(host), str(target)])
        yield
    finally:
        unmount_all(root)
        for inside in binds.values():  # the mount points left in the root (its /tmp would fill with them)
            with contextlib.suppress(OSError):
                (root / str(inside).lstrip("/")).rmdir()


# --- root, wheels, install ----------------------------------------------------------------------------------------
def build_root(root: Path) -> dict[str, Any]:
    """The bookworm arm64 root, built once (temp folder, then rename); its build record."""
    marker = root / MARKER
    if marker.exists():
        return {**json.loads(marker.read_text()), "built_now": False}
    tmp = root.with_name(root.name + ".tmp")
    remove_half_built(tmp)
    remove_half_built(root)
    mirror = debian_mirror()
    start = time.monotonic()
    run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
         str(tmp), *mirror], timeout=3600)
    record = {"debootstrap_seconds": round(time.monotonic() - start, 1), "mirror_from_apt": bool(mirror),
              "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    (tmp / MARKER).write_text(json.dumps(record))
    os.replace(tmp, root)
    return {**record, "built_now": True}


def wheelhouse(cache: Path) -> tuple[Path, float | None]:
    """The edge extra's wheels for the root (CPython 3.11, aarch64), plus setuptools to build '.', downloaded
    once per pyproject.toml; (folder, seconds it took now or None)."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    folder = cache / f"wheelhouse-{key}"
    if (folder / ".complete").exists():
        return folder, None
    start = time.monotonic()
    for old in cache.glob("wheelhouse-*"):  # a half-made one, and those of older pyproject.toml files
        remove_tree(old)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp))
        run([sys.executable, "-m", "pip", "download", "-q", "-d", str(folder), "--only-binary=:all:",
             "--python-version", PI.python, "--implementation", "cp",
             *(f"--platform={t}" for t in PI.platform_tags()), f"reled[edge] @ {wheel.as_uri()}", "setuptools>=77"])
    for own in folder.glob("reled-*.whl"):  # the root builds this checkout itself
        own.unlink()
    (folder / ".complete").touch()
    return folder, round(time.monotonic() - start, 1)


def install(root: Path) -> dict[str, Any]:
    """`pip install '.[edge]'` from the wheelhouse, no index, in the root's venv (made on the first run)."""
    source = root / SOURCE.lstrip("/")
    remove_tree(source)
    source.mkdir(parents=True)
    shutil.copytree(REPO / "edge_runtime", source / "edge_runtime", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    cold = not (root / VENV.lstrip("/") / "bin" / "python").exists()
    start = time.monotonic()
    if cold:
        in_root(root, "python3", "-m", "venv", VENV)
    in_root(root, f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEELHOUSE,
            f"{SOURCE}[edge]")
    seconds = round(time.monotonic() - start, 1)
    installed = in_root(root, f"{VENV}/bin/python", "-c", "import edge_runtime.fileio as f; print(f.__file__)")
    copy = root / installed.stdout.strip().lstrip("/")
    if copy.read_bytes() != (REPO / "edge_runtime" / "fileio.py").read_bytes():
        raise RELEDError(f"the root's edge_runtime ({copy}) is not this checkout's")
    return {"install_seconds": seconds, "install_cold": cold}


# --- the run ------------------------------------------------------------------------------------------------------
def export(out: Path, version: int) -> Path:
    """A cologne8 policy from the trainer (a freshly initialized actor: the platform, not the policy, is tested)."""
    run([sys.executable, "-m", "trainer", "export", "--scenario", "cologne8", "--out", str(out), "--policy-version",
         str(version), "--seed", str(version), "--holdout-decisions", "20"], timeout=600)
    return out


def record(out: Path, light: str) -> Path:
    """The light's detector readings from a cologne8 SUMO episode (`reled record`): what the daemon replays."""
    from edge_runtime.recordings import recording_name

    run([sys.executable, "-m", "trainer", "record", "--scenario", "cologne8", "--light", light, "--out", str(out)],
        timeout=600)
    return out / recording_name(light)


def inside(root: Path, work: Path, policy: Path, rows: Path | None = None) -> dict[str, Any]:
    """tools/arm64/inside.py in the root: platform, self-test, decision time (and logits for ``rows``)."""
    script = work / "inside.py"
    shutil.copy2(REPO / "tools" / "arm64" / "inside.py", script)
    out = work / "inside.json"
    extra = [str(rows), str(work / "arm64-logits.npz")] if rows else []
    in_root(root, f"{VENV}/bin/python", str(script), str(policy), str(out), *extra, timeout=600)
    return json.loads(out.read_text())


def outbox_rows(path: Path, version: int) -> dict[str, np.ndarray]:
    """The daemon's decisions with policy ``version`` (observation, mask, action, when), from its outbox."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        found = db.execute("SELECT obs, mask, action, added FROM rows WHERE source = ? AND policy_version = ? "
                           "ORDER BY id", (SOURCE_POLICY, version)).fetchall()
    return {"obs": np.array([np.frombuffer(r[0], np.float32) for r in found]).reshape(len(found), -1),
            "mask": np.array([np.frombuffer(r[1], bool) for r in found]).reshape(len(found), -1),
            "action": np.array([r[2] for r in found], np.int64), "added": np.array([r[3] for r in found])}


def count_rows(path: Path, version: int) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        return int(db.execute("SELECT COUNT(*) FROM rows WHERE source = ? AND policy_version = ?",
                              (SOURCE_POLICY, version)).fetchone()[0])


def timed_edge(fleet: LocalFleet, *args: str, timeout: float) -> tuple[float, str]:
    start = time.monotonic()
    proc = fleet.edge(*args, timeout=timeout + 60)
    if proc.returncode != 0:
        raise RELEDError(f"reled-edge {args[0]} failed ({proc.returncode}): {last_line(proc.stderr + proc.stdout)}")
    return round(time.monotonic() - start, 1), last_line(proc.stdout)


def fleet_run(root: Path, work: Path, models: dict[int, Model], decisions: int, speed: float) -> dict[str, Any]:
    """The daemon in the root, deployed to and rolled back from this machine through a loopback broker."""
    fleet = LocalFleet(work / "fleet")
    light, greens = next(iter(models[1].phase_tables.items()))
    fleet.write_device(DEVICE, light, greens, recording=record(work / "recordings", light),
                       runtime={"decision_seconds": 1.0, "speed": speed},
                       probation={"decisions": 10},
                       # emulation runs a decision 10-50x slower than the hardware: the budget is not what is tested
                       inference={"latency_budget_ms": 500.0}, download={"chunk_timeout": 10.0})
    outbox = fleet.root / "state" / DEVICE / "outbox.sqlite"
    figures: dict[str, Any] = {"device": DEVICE, "intersection": light}
    try:
        fleet.init_keys()
        fleet.start_broker()
        link = fleet.observer()
        with (fleet.root / f"{DEVICE}.daemon.log").open("a") as log:
            start = time.monotonic()
            proc = subprocess.Popen(["chroot", str(root), f"{VENV}/bin/reled-edge", "daemon", "--config",
                                     str(fleet.devices / f"{DEVICE}.toml")], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=CLEAN_ENV)
        fleet.daemons[DEVICE] = proc  # fleet.close() stops it
        wait_for(lambda: DEVICE in link.reported or proc.poll() is not None, 300, "the arm64 daemon's first report",
                 poll=lambda: link.pump(0.1))
        if proc.poll() is not None:
            raise RELEDError(f"the arm64 daemon exited ({proc.returncode}): "
                             f"{last_line((fleet.root / f'{DEVICE}.daemon.log').read_text())}")
        figures["first_report_seconds"] = round(time.monotonic() - start, 1)
        daemon = psutil.Process(proc.pid)
        figures["daemon_exe"] = daemon.exe()
        for version in (1, 2):
            seconds, said = timed_edge(fleet, "deploy", "--device", DEVICE, "--model", str(models[version].path),
                                       "--timeout", "300", timeout=900)
            figures[f"deploy_v{version}"] = {"seconds": seconds, "said": said}
            wait_for(lambda v=version: (link.reported.get(DEVICE, {}).get("active") or {}).get("sha256")
                     == models[v].sha256, 60, f"v{version} active", poll=lambda: link.pump(0.1))
            figures[f"deploy_v{version}"]["state"] = link.reported[DEVICE]["state"]
            if version == 1:  # the decisions, with the daemon's memory sampled meanwhile
                rss: list[int] = []

                def decided(samples: list[int] = rss) -> bool:
                    samples.append(daemon.memory_info().rss)
                    return count_rows(outbox, 1) >= decisions

                wait_for(decided, 900, f"{decisions} decisions with v1", poll=lambda: link.pump(0.5))
                figures["rss_mb_max"] = round(max(rss) / 2**20, 1)
        seconds, said = timed_edge(fleet, "rollback", "--device", DEVICE, "--timeout", "120", timeout=120)
        wait_for(lambda: (link.reported.get(DEVICE, {}).get("active") or {}).get("sha256") == models[1].sha256,
                 60, "v1 active again", poll=lambda: link.pump(0.1))
        figures["rollback"] = {"seconds": seconds, "said": said, "state": link.reported[DEVICE]["state"]}
        figures["faults"] = link.reported[DEVICE].get("faults", {})
        figures["rss_mb_end"] = round(daemon.memory_info().rss / 2**20, 1)
    finally:
        fleet.close()
    return figures


def parity(root: Path, work: Path, model: Model, decisions: int) -> dict[str, Any]:
    """The arm64 daemon's decisions with ``model`` against ONNX Runtime on this machine, same observations."""
    rows = outbox_rows(work / "fleet" / "state" / DEVICE / "outbox.sqlite", model.policy_version)
    if len(rows["action"]) < decisions:
        raise RELEDError(f"only {len(rows['action'])} decisions with v{model.policy_version} were recorded")
    np.savez(work / "rows.npz", obs=rows["obs"], mask=rows["mask"])
    inside(root, work, model.path, work / "rows.npz")
    with np.load(work / "arm64-logits.npz") as arm:
        arm_logits, arm_actions = arm["logits"], arm["actions"]
    x86_logits, x86_actions = OnnxPolicy(model.path).run(rows["obs"], rows["mask"])
    mask = rows["mask"]
    first = rows["added"][:decisions]
    return {"decisions": len(rows["action"]),
            "decisions_per_second": round((decisions - 1) / (first[-1] - first[0]), 1),
            "identical_actions_daemon_vs_x86": int((rows["action"] == x86_actions).sum()),
            "identical_actions_arm64_vs_x86": int((arm_actions == x86_actions).sum()),
            "max_logit_difference": float(np.abs(arm_logits[mask] - x86_logits[mask]).max())}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every default in --help."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root", type=Path, default=CACHE / "bookworm", help="where the arm64 root is kept")
    parser.add_argument("--decisions", type=int, default=500, help="decisions the daemon makes with policy v1 (at "
                                                                   "least; all of them are compared with x86)")
    parser.add_argument("--speed", type=float, default=1000.0,
                        help="decisions asked per second (1 s decisions at this replay speed): more than emulation "
                             "keeps up with, so the rate measured is what the daemon manages")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: unmount, stop the fleet
    try:
        check_machine()
    except Skip as exc:
        print(f"skipped: {exc}")
        return 0
    root = args.root.resolve()
    figures: dict[str, Any] = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                                        "date": time.strftime("%Y-%m-%d")}}
    total = time.monotonic()
    try:
        unmount_all(root)  # what a killed run left mounted
        figures["root"] = build_root(root)
        wheels, seconds = wheelhouse(root.parent)
        figures["wheelhouse"] = {"seconds": seconds, "wheels": len(list(wheels.glob("*.whl")))}
        with tempfile.TemporaryDirectory(prefix="reled-arm64-") as tmp:
            work = Path(tmp)
            models = {v: Model.load(export(work / f"v{v}.onnx", v)) for v in (1, 2)}
            with mounted(root, {wheels: Path(WHEELHOUSE), work: work}):
                figures["install"] = install(root)
                figures["inside"] = inside(root, work, models[1].path)
                figures["fleet"] = fleet_run(root, work, models, args.decisions, args.speed)
                figures["parity"] = parity(root, work, models[1], args.decisions)
    except (RELEDError, TimeoutError, psutil.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    figures["total_seconds"] = round(time.monotonic() - total, 1)
    print(json.dumps(figures, indent=1))
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=1) + "\n")
    return check(figures, args.decisions)


def check(figures: dict[str, Any], decisions: int) -> int:
    """The outcomes the run must show; each failure on a line."""
    fleet, par, ins = figures["fleet"], figures["parity"], figures["inside"]
    problems = [
        *([] if ins["machine"] == "aarch64" else [f"the root ran {ins['machine']}, not aarch64"]),
        *([] if ins["selftest"] == "passed" else [f"self-test: {ins['selftest']}"]),
        *(f"deploy of v{v}: {fleet[f'deploy_v{v}']['state']}" for v in (1, 2)
          if fleet[f"deploy_v{v}"]["state"] != "COMMITTED"),
        *([] if fleet["rollback"]["state"] == "ROLLED_BACK" else [f"rollback: {fleet['rollback']['state']}"]),
        *([] if par["identical_actions_daemon_vs_x86"] == par["decisions"] else
          [f"{par['decisions'] - par['identical_actions_daemon_vs_x86']} of {par['decisions']} actions differ"]),
        *([] if par["decisions"] >= decisions else [f"{par['decisions']} decisions, {decisions} asked"]),
    ]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
