"""The road network as sumolib reads it, parsed once per file and process.

Road graphs, phase layouts and subset maps all walk the same net; cologne8's takes about a second to
parse, so each file is read once and shared (callers treat it as read-only).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError


def read_net(net_file: Path | str) -> Any:
    """The sumolib net of ``net_file`` (no internal lanes), or a one-line error when it cannot be parsed."""
    return _read(str(Path(net_file).resolve()))


@functools.lru_cache(maxsize=8)
def _read(path: str) -> Any:
    import sumolib

    try:
        return sumolib.net.readNet(path, withInternal=False)
    except Exception as exc:  # sumolib raises bare exceptions on malformed XML
        raise RELEDError(f"cannot read net {path}: {exc}") from exc
