"""Build a scenario folder in a temp dir beside its final place, then rename: never half-written."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_folder


@contextlib.contextmanager
def building_folder(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder; on success it becomes ``final``, on error it is removed."""
    if final.exists() and not replace:
        raise RELEDError(f"{final} already exists: pass --force to rebuild it, or choose another --name")
    with atomic_folder(final) as tmp:
        yield tmp
