"""Where SUMO lives inside the venv, and running its command-line tools with clear errors."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

from edge_runtime.errors import RELEDError

log = logging.getLogger(__name__)


@functools.cache
def sumo_home() -> Path:
    """SUMO's root folder, also exported as ``SUMO_HOME`` for SUMO's tools and sumo-rl.

    A ``SUMO_HOME`` that holds ``bin/sumo`` (a source build) wins; otherwise the ``eclipse-sumo``
    wheel's folder. Some packages (libsumo's data wheel) point ``SUMO_HOME`` at a data-only folder
    without binaries, so the variable alone is not trusted.
    """
    env = os.environ.get("SUMO_HOME")
    if env and (Path(env) / "bin" / "sumo").exists():
        return Path(env)
    try:
        import sumo
    except ImportError as exc:
        raise RELEDError("SUMO is not installed: run `make install` (pip install 'reled[train]')") from exc
    os.environ["SUMO_HOME"] = sumo.SUMO_HOME
    return Path(sumo.SUMO_HOME)


def sumo_binary(name: str) -> str:
    """Path of a SUMO executable (``sumo``, ``sumo-gui``, ``netconvert``...)."""
    candidate = sumo_home() / "bin" / name
    return str(candidate) if candidate.exists() else name


def sumo_tool(script: str) -> Path:
    """Path of a script under SUMO's ``tools/`` folder (randomTrips.py, ...)."""
    path = sumo_home() / "tools" / script
    if not path.exists():
        raise RELEDError(f"SUMO tool {script} not found under {sumo_home()}: reinstall eclipse-sumo")
    return path


def run_sumo_command(args: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a SUMO program or tool; on failure raise a one-line error quoting SUMO's own reason."""
    if args[0].endswith(".py"):
        args = [sys.executable, *args]
    log.debug("running %s", " ".join(map(str, args)))
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "SUMO_HOME": str(sumo_home())})
    if proc.returncode != 0:
        raise RELEDError(f"{what} failed: {first_error_line(proc.stderr + proc.stdout)}")
    return proc.stdout


def first_error_line(text: str) -> str:
    """The most telling line of a SUMO error dump (SUMO prints 'Error: ...')."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Error:") or "Error" in ln:
            return ln
    return lines[-1] if lines else "no output"
