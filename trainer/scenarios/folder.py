"""Build a scenario folder in a temp dir beside its final place, then rename: never half-written."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edge_runtime.errors import RELEDError


@contextlib.contextmanager
def building_folder(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder; on success it becomes ``final``, on error it is removed."""
    if final.exists() and not replace:
        raise RELEDError(f"{final} already exists: pass --force to rebuild it, or choose another --name")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
