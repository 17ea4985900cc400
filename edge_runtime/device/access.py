"""Whether the service user can use what an installed controller needs, decided by the kernel as that user.

`reled-edge install --check` runs as root; a forked child takes the service user's uid, gid and groups and then
opens every input, writes (and removes) a scratch file in every folder the daemon writes, and runs the venv's
Python the way systemd will. Ownership, modes, ACLs and every folder above a file count exactly as they will for
the daemon, which reading permission bits in the parent could only approximate.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import RELEDError

READ, WRITE, APPEND, EXEC, RUN = "read", "write", "append", "exec", "run"  # what the daemon does with a path
RUN_CHECK = "import edge_runtime.device.daemon"  # the daemon's whole import chain (numpy, onnxruntime, paho, ...)
RUN_SECONDS = 120.0  # a Raspberry Pi imports onnxruntime in a few seconds


@dataclass(frozen=True)
class Need:
    """``path``, which the daemon (as the service user) must be able to ``kind``; ``what`` names it for the user."""

    what: str
    path: Path
    kind: str = READ


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check(need: Need, env: dict[str, str]) -> str | None:
    """The problem with one need, tried for real; runs as the service user."""
    path = need.path
    try:
        if need.kind == READ:
            with path.open("rb") as fh:
                fh.read(1)
        elif need.kind == APPEND and path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        elif need.kind in (WRITE, APPEND):
            folder = path if need.kind == WRITE else path.parent
            base = _existing(folder)
            if not base.is_dir():
                return f"{need.what} {folder}: {base} is not a folder"
            fd, scratch = tempfile.mkstemp(dir=base, prefix=".reled-check-")
            os.close(fd)
            os.unlink(scratch)
        elif need.kind == EXEC:
            if not path.is_file() or not os.access(path, os.X_OK):  # the real ids are the user's by now
                return f"{need.what} {path} is not an executable file for this user"
        elif need.kind == RUN:
            proc = subprocess.run([str(path), "-c", RUN_CHECK], capture_output=True, text=True, env=env,
                                  timeout=RUN_SECONDS, cwd="/")
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                return f"{need.what} {path} cannot import the daemon: {last}"
    except subprocess.TimeoutExpired:
        return f"{need.what} {path} took over {RUN_SECONDS:g} s to import the daemon"
    except OSError as exc:
        if need.kind == RUN:
            return (f"{need.what} {path} cannot be run by {env['USER']}: {exc.strerror} (the interpreter it links to "
                    "and every folder above it must be open to that user)")
        return f"{need.what} {exc.filename or path}: {exc.strerror} for {env['USER']}"
    return None


def _child(needs: list[Need], user: pwd.struct_passwd, out: int) -> None:
    """In the forked child: become ``user`` for good, check, write the problems as JSON to ``out``."""
    if os.geteuid() == 0:
        os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    os.chdir("/")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": user.pw_dir, "USER": user.pw_name,
           "LOGNAME": user.pw_name, "LANG": "C.UTF-8"}  # what systemd gives a service with User=
    problems = [p for need in needs if (p := _check(need, env)) is not None]
    with os.fdopen(out, "w") as fh:
        json.dump(problems, fh)


def problems_as(user: str, needs: list[Need]) -> list[str]:
    """Every need ``user`` cannot meet, one line each (empty: all met). Run as root, or as ``user`` itself."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return [f"user {user!r} does not exist: run `reled-edge install` without --check (or --no-user: create it)"]
    if os.geteuid() not in (0, entry.pw_uid):
        raise RELEDError(f"checking what user {user!r} can read needs root (or run it as {user})")
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child's outcome is what the parent reads)
        code = 1
        try:
            os.close(read_end)
            _child(needs, entry, write_end)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        text = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not text:
        raise RELEDError(f"the check as user {user!r} failed (exit status {os.waitstatus_to_exitcode(status)}): "
                         "see the traceback above")
    return list(json.loads(text))
