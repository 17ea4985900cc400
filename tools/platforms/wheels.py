#!/usr/bin/env python3
"""Does `pip install 'reled[edge]'` find binary wheels on every platform the controller supports?

Why: a controller (Raspberry Pi OS, a Jetson's Ubuntu 22.04) should install from wheels, never build
ONNX Runtime, NumPy or cryptography from source; and a new release of a dependency that drops a
platform (cp310, aarch64) must be caught here, not on a cabinet. For each row of :data:`PLATFORMS`
this resolves the ``edge`` extra of this checkout's own wheel with ``pip install --dry-run --report``,
``--only-binary=:all:`` and the row's ``--platform``/``--python-version``; nothing is installed.

pip evaluates environment markers for the interpreter that runs it, not for the target, so a
requirement whose marker holds only there (``tomli; python_version < '3.11'`` on 3.10) would be missed:
the markers of everything resolved are evaluated again for the target and what is missing is added,
until the set is closed. pip's own HTTP cache keeps a second run quick.

    .venv/bin/python tools/platforms/wheels.py                 # every supported platform
    .venv/bin/python tools/platforms/wheels.py --json out/wheels.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from edge_runtime.errors import RELEDError  # noqa: E402  (the checkout's, whatever is installed)

MAX_ROUNDS = 5  # marker closure: one extra round adds tomli on 3.10; more would mean a loop


@dataclass(frozen=True)
class Platform:
    """One row of docs/edge.md's table of supported platforms."""

    name: str
    python: str  # "3.10"
    machine: str  # uname -m: aarch64, x86_64, armv7l
    glibc: tuple[int, int]  # the oldest glibc of the row: wheels for a newer one do not run there

    def platform_tags(self) -> list[str]:
        """pip's --platform values: every manylinux tag up to the row's glibc (pip does not expand them)."""
        major, minor = self.glibc
        return [f"manylinux_{major}_{m}_{self.machine}" for m in range(17, minor + 1)] + \
            ([f"manylinux2014_{self.machine}"] if self.machine in ("aarch64", "x86_64", "armv7l") else [])

    def supported(self) -> set[Tag]:
        """The wheel tags a CPython of this row installs."""
        cp = "cp" + self.python.replace(".", "")
        abis = [cp, "abi3", "none"]
        interpreters = [cp, *(f"cp3{m}" for m in range(2, int(self.python.split(".")[1])))]
        tags = {Tag(i, a, p) for i in interpreters for a in abis for p in [*self.platform_tags(), "any"]
                if a != cp or i == cp}
        return tags | {Tag(f"py3{m}", "none", "any") for m in range(0, 14)} | {Tag("py3", "none", "any")}

    def environment(self) -> dict[str, str]:
        """PEP 508 marker values on this platform."""
        return {"python_version": self.python, "python_full_version": f"{self.python}.0", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": self.machine, "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"}


PLATFORMS = (
    Platform("Raspberry Pi OS Bookworm 64-bit", "3.11", "aarch64", (2, 36)),
    Platform("JetPack 6 (Ubuntu 22.04)", "3.10", "aarch64", (2, 35)),
    *(Platform("x86-64 Linux", v, "x86_64", (2, 28)) for v in ("3.10", "3.11", "3.12", "3.13")),
)
UNSUPPORTED = Platform("Raspberry Pi OS 32-bit", "3.11", "armv7l", (2, 36))  # ONNX Runtime has no armv7 wheel


@dataclass(frozen=True)
class Resolution:
    platform: Platform
    versions: dict[str, str]  # distribution -> version pip chose
    wheels: list[str]  # the file names
    rounds: int  # pip runs until the markers were closed


def build_wheel(out: Path) -> Path:
    """This checkout as a wheel (its metadata is what a controller's pip reads)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(REPO)], capture_output=True, text=True)
    wheels = sorted(out.glob("reled-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RELEDError(f"building the reled wheel failed: {last_line(proc.stderr)}")
    return wheels[-1]


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "is ignored: it is neither" not in ln]
    return lines[-1].strip() if lines else "(no output)"


def pip_report(platform: Platform, requirements: list[str], work: Path) -> list[dict[str, Any]]:
    """The items pip would install on ``platform``, binary wheels only."""
    report = work / "report.json"
    report.unlink(missing_ok=True)
    args = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
            "--only-binary=:all:", "--python-version", platform.python, "--implementation", "cp",
            "--target", str(work / "target"), *(f"--platform={t}" for t in platform.platform_tags()), *requirements]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not report.exists():
        raise RELEDError(f"{platform.name}, Python {platform.python}, {platform.machine}: the edge extra has no "
                         f"binary install: {last_line(proc.stderr)}")
    return json.loads(report.read_text())["install"]


def missing_on_target(items: list[dict[str, Any]], platform: Platform) -> list[str]:
    """Requirements of the resolved items whose markers hold on ``platform`` but that pip left out."""
    have = {canonicalize_name(i["metadata"]["name"]) for i in items}
    env = platform.environment()
    missing = []
    for item in items:
        extras = ["", *item.get("requested_extras", [])]
        for text in item["metadata"].get("requires_dist", []):
            req = Requirement(text)
            holds = req.marker is None or any(Marker(str(req.marker)).evaluate({**env, "extra": e}) for e in extras)
            if holds and canonicalize_name(req.name) not in have:
                missing.append(str(Requirement(text.split(";")[0])))
    return sorted(set(missing))


def resolve(wheel: Path, platform: Platform, work: Path) -> Resolution:
    """What `pip install 'reled[edge]'` takes on ``platform``; RELEDError when a dependency has no fitting wheel."""
    requirements = [f"reled[edge] @ {wheel.resolve().as_uri()}"]
    rounds = 0
    while True:
        rounds += 1
        items = pip_report(platform, requirements, work)
        missing = missing_on_target(items, platform)
        if not missing:
            break
        if rounds == MAX_ROUNDS:
            raise RELEDError(f"{platform.name}: the markers did not close after {MAX_ROUNDS} pip runs ({missing})")
        requirements += missing
    supported = platform.supported()
    wheels = []
    for item in items:
        name = item["download_info"]["url"].rsplit("/", 1)[-1]
        if not name.endswith(".whl"):
            raise RELEDError(f"{platform.name}: {name} is not a wheel")
        if not parse_wheel_filename(name)[3] & supported:
            raise RELEDError(f"{platform.name}, Python {platform.python}: {name} does not run there")
        wheels.append(name)
    versions = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    return Resolution(platform, versions, sorted(wheels), rounds)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every default in --help."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the resolutions here")
    args = parser.parse_args()
    from rich.table import Table

    from edge_runtime.console import console
    from edge_runtime.fileio import atomic_write_text

    table = Table(title="pip install 'reled[edge]', binary wheels only")
    for column in ("platform", "Python", "machine", "glibc", "onnxruntime", "numpy", "wheels", "outcome"):
        table.add_column(column)
    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="reled-wheels-") as tmp:
        wheel = build_wheel(Path(tmp) / "dist")
        for platform in (*PLATFORMS, UNSUPPORTED):
            row = [platform.name, platform.python, platform.machine, "{}.{}".format(*platform.glibc)]
            try:
                res = resolve(wheel, platform, Path(tmp))
            except RELEDError as exc:
                failed |= platform is not UNSUPPORTED
                table.add_row(*row, "", "", "", str(exc).rsplit(": ", 1)[-1])
                results.append({"platform": asdict(platform), "error": str(exc)})
                continue
            table.add_row(*row, res.versions.get("onnxruntime", ""), res.versions.get("numpy", ""),
                          str(len(res.wheels)), "ok")
            results.append({"platform": asdict(platform), "versions": res.versions, "wheels": res.wheels,
                            "pip_runs": res.rounds})
    console.print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
