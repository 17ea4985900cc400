"""Helpers shared by the CLI tests: run `reled` as users do, check the one-line errors."""

from __future__ import annotations

import subprocess
import sys

REL = [sys.executable, "-m", "trainer"]


def reled(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*REL, *args], capture_output=True, text=True, timeout=600, **kw)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
