"""The road network as sumolib reads it, parsed once per file and process.

Road graphs, phase layouts and subset maps all walk the same net; cologne8's takes about a second to
parse, so each file is read once and shared (callers treat it as read-only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

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


@dataclass(frozen=True)
class SignalProgram:
    """A light's own fixed-time program as the net defines it."""

    offset: float
    phases: tuple[tuple[str, float], ...]  # (link states, seconds) in program order


def signal_programs(net_file: Path | str) -> dict[str, SignalProgram]:
    """Every light's first program in the net file (tlLogic elements; read without building the net)."""
    return _programs(str(Path(net_file).resolve()))


@functools.lru_cache(maxsize=8)
def _programs(path: str) -> dict[str, SignalProgram]:
    programs: dict[str, SignalProgram] = {}
    try:
        for _event, elem in ElementTree.iterparse(path):
            if elem.tag == "tlLogic":
                tls = elem.get("id", "")
                if tls not in programs:
                    phases = tuple((p.get("state", ""), float(p.get("duration", 0))) for p in elem.iter("phase"))
                    programs[tls] = SignalProgram(float(elem.get("offset", 0) or 0), phases)
            if elem.tag in ("tlLogic", "edge", "junction"):
                elem.clear()
    except (ElementTree.ParseError, ValueError) as exc:
        raise RELEDError(f"cannot read the signal programs of {path}: {exc}") from exc
    return programs
