"""Atomic file writes: a reader never sees a half-written file, a failed write leaves the old one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a replaced file gets the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (models do not need to fit in memory twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write and fsync, so a power cut after the rename cannot leave an empty file behind it."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's contents, or a one-line error naming the file and the problem."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RELEDError(f"{path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RELEDError(f"{path} is not valid TOML: {exc}") from exc
