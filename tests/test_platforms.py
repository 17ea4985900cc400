"""The controller's platforms (docs/edge.md, "Supported platforms"): its code needs Python 3.10 at most, its
`edge` extra installs from binary wheels on every supported platform, and its tests pass on Python 3.10.
The arm64 run (`make test-arm64`, tools/arm64/run.py) is not part of the suite: docs/edge.md says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime.errors import RELEDError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "platforms"))

import py310  # noqa: E402
import wheels  # noqa: E402

EDGE_REQUIREMENTS = {"numpy", "onnxruntime", "paho-mqtt", "cryptography", "pynacl", "msgpack", "zstandard", "typer",
                     "rich", "tomli-w"}


def vermin(*paths: Path) -> subprocess.CompletedProcess:
    """vermin's command line (it has no `python -m` entry) with the controller's floor, Python 3.10, as target."""
    return subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--no-tips",
                           "--violations", "--eval-annotations", "-t=3.10-", *map(str, paths)],
                          capture_output=True, text=True, timeout=300)


def test_the_controller_code_runs_on_python_3_10(tmp_path):
    proc = vermin(REPO / "edge_runtime")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the check sees what 3.10 lacks
    newer = tmp_path / "newer.py"
    newer.write_text("import tomllib\nimport enum\nclass S(enum.StrEnum):\n    A = 'A'\n")
    proc = vermin(newer)
    assert proc.returncode != 0 and "tomllib" in proc.stdout and "StrEnum" in proc.stdout, proc.stdout


def test_markers_are_evaluated_for_the_target_python():
    items = [{"metadata": {"name": "reled", "requires_dist": ["numpy>=1.26", "tomli>=1.1; python_version < '3.11'",
                                                              "onnxruntime>=1.18; extra == 'edge'",
                                                              "torch==2.13.0; extra == 'train'"]},
              "requested_extras": ["edge"]},
             {"metadata": {"name": "numpy"}}]
    jetson, pi = wheels.PLATFORMS[1], wheels.PLATFORMS[0]
    assert wheels.missing_on_target(items, jetson) == ["onnxruntime>=1.18", "tomli>=1.1"]
    assert wheels.missing_on_target(items, pi) == ["onnxruntime>=1.18"]


@pytest.fixture(scope="module")
def reled_wheel(tmp_path_factory) -> Path:
    return wheels.build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
@pytest.mark.parametrize("platform", wheels.PLATFORMS, ids=lambda p: f"{p.machine}-py{p.python}")
def test_the_edge_extra_installs_from_binary_wheels(platform, reled_wheel, tmp_path):
    resolution = wheels.resolve(reled_wheel, platform, tmp_path)  # raises when a file does not fit the platform
    assert not EDGE_REQUIREMENTS - set(resolution.versions), resolution.versions
    assert ("tomli" in resolution.versions) == (platform.python == "3.10"), resolution.versions
    assert all(name.endswith(".whl") for name in resolution.wheels)


@pytest.mark.slow
def test_a_platform_without_wheels_is_caught(reled_wheel, tmp_path):
    with pytest.raises(RELEDError, match=r"armv7l: the edge extra has no binary install: .*No matching distribution"):
        wheels.resolve(reled_wheel, wheels.UNSUPPORTED, tmp_path)


def test_the_trainer_stops_on_python_3_10_with_one_line(assert_one_line_error):
    python = py310.find_python310(None)
    if python is None:
        pytest.skip("no Python 3.10 here")
    proc = subprocess.run([python, "-c", "import trainer"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_line_error(proc, "needs Python 3.11", "reled-edge")


@pytest.mark.slow
def test_the_controller_tests_pass_on_python_3_10():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "platforms" / "py310.py"), "--quick"],
                          capture_output=True, text=True, timeout=1200)
    if proc.stdout.startswith("skipped:"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Python 3.10." in proc.stdout and " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout
