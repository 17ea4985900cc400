"""Atomic file and folder writes: a reader never sees a half-written one, a failed write leaves the old one."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError

if sys.version_info >= (3, 11):
    import tomllib
else:  # a Jetson's Ubuntu 22.04 has Python 3.10: tomli is tomllib's original (a dependency there only)
    import tomli as tomllib

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds.

    The temp file already has its final ``mode`` (default: the usual 0666 & ~umask) when yielded, so a
    secret written into it (``mode=0o600``) is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``folder``; it replaces ``folder`` only if the block succeeds.

    An existing ``folder`` is moved aside first and removed after the swap, so readers see either the
    old folder or the new one, never a half-built one. Callers decide whether replacing is allowed.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in blocks (models do not need to fit in memory twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):  # hashlib.file_digest is Python 3.11+; controllers run 3.10 too
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    """SHA-256 of bytes in memory (a model chunk, a model already read), in the same hex form as the files'."""
    return hashlib.sha256(data).hexdigest()


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write and fsync, so a power cut after the rename cannot leave an empty file behind it."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` also fsyncs (state a power cut must not lose),
    ``mode`` sets the permissions before the first byte is written (0o600 for secrets)."""
    with atomic_path(path, mode) as tmp:
        if durable:
            write_durably(tmp, data)
        else:
            tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str, *, durable: bool = False, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), durable=durable, mode=mode)


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's contents, or a one-line error naming the file and the problem."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RELEDError(f"{path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RELEDError(f"{path} is not valid TOML: {exc}") from exc
