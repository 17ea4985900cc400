#!/usr/bin/env python3
"""Run the controller's tests under Python 3.10, the Python of a Jetson's Ubuntu 22.04 (JetPack 6).

Why: the controller (`edge_runtime`) must run on 3.10 while everything else here is developed on 3.11;
only running its tests there shows that it does. This finds a 3.10 interpreter, makes a virtualenv for it
(cached, rebuilt when pyproject.toml changes) with `pip install '.[edge]'` and the test tools, and runs the
controller's tests in it with this checkout first on the path. The fleet tests deploy policies that the
trainer (3.11 only) exports: this interpreter exports them first and hands them over (RELED_TEST_MODELS).
Without a 3.10 interpreter it says so on one line and exits 0 (skipped).

    .venv/bin/python tools/platforms/py310.py            # every controller test (make test-py310)
    .venv/bin/python tools/platforms/py310.py --quick    # the fast ones (the test suite runs these)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from edge_runtime.errors import RELEDError  # noqa: E402  (the checkout's)

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reled"
# The tests that use the controller's code only (edge_runtime and its dependencies, no trainer).
QUICK_TESTS = ["tests/test_shield.py", "tests/test_settings.py", "tests/test_edge_units.py",
               "tests/test_edge_deployment.py", "tests/test_edge_tls.py"]
FLEET_TESTS = ["tests/test_edge_broker.py", "tests/test_edge_fleet.py", "tests/test_edge_fleet_tools.py",
               "tests/test_edge_hardening.py", "tests/test_edge_bridge.py"]
# What the tests need besides the edge extra: the dev tools, psutil (process trees), onnx (test policies).
TEST_EXTRAS = ["psutil>=5.9", "onnx>=1.17"]


def find_python310(given: str | None) -> str | None:
    """--python, $RELED_PY310, python3.10 on the PATH, or pyenv's newest 3.10."""
    candidates = [given, os.environ.get("RELED_PY310"), shutil.which("python3.10"),
                  *sorted(map(str, Path.home().glob(".pyenv/versions/3.10.*/bin/python")), reverse=True),
                  *sorted(map(str, Path("/root").glob(".pyenv/versions/3.10.*/bin/python")), reverse=True)]
    for python in filter(None, candidates):
        proc = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
                              capture_output=True, text=True)
        if proc.stdout.strip() == "True":
            return python
    return None


def venv_for(python: str) -> Path:
    """A virtualenv of ``python`` with the edge extra and the test tools, made once per pyproject.toml."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + " ".join([python, *TEST_EXTRAS]).encode())
    venv = CACHE / f"py310-{key.hexdigest()[:12]}"
    done = venv / ".reled-complete"
    if done.exists():
        return venv
    for old in CACHE.glob("py310-*"):  # a half-made one (an install that failed or was killed), older ones
        shutil.rmtree(old, ignore_errors=True)
    for command in ([python, "-m", "venv", str(venv)],
                    [str(venv / "bin/python"), "-m", "pip", "install", "-q", f"{REPO}[edge,dev]", *TEST_EXTRAS]):
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            said = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()] or ["no output"]
            raise RELEDError(f"{' '.join(command[:4])} ... failed: {said[-1].strip()}")
    done.touch()
    return venv


def export_models(out: Path) -> None:
    """Policies v1-v3, exported by this interpreter's trainer as the fleet tests' fixture would."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import export_policy

    for version in (1, 2, 3):
        export_policy(out / f"v{version}.onnx", version, seed=version)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every default in --help."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--python", help="the 3.10 interpreter (unset: found as the description says)")
    parser.add_argument("--quick", action="store_true", help="only the fast tests that start no daemon fleet "
                                                             "(else every controller test)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()
    python = find_python310(args.python)
    if python is None:
        print("skipped: no Python 3.10 found (give --python or RELED_PY310, or put python3.10 on the PATH)")
        return 0
    try:
        venv = venv_for(python)
    except RELEDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tests = QUICK_TESTS if args.quick else QUICK_TESTS + FLEET_TESTS
    with tempfile.TemporaryDirectory(prefix="reled-py310-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if not args.quick:
            export_models(Path(tmp))
            env["RELED_TEST_MODELS"] = tmp
        where = subprocess.run([str(venv / "bin/python"), "-c", "import sys, edge_runtime; "
                                "print(sys.version.split()[0], edge_runtime.__file__)"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        print(f"Python {where}")
        command = [str(venv / "bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                   *args.pytest_args]
        return subprocess.run(command, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
