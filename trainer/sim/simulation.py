"""One SUMO instance behind libsumo (fast, one per process) or TraCI (sockets, GUI, many per process)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_runtime.errors import RELEDError
from trainer.scenarios.model import Scenario
from trainer.sim.sumo_tools import first_error_line, sumo_binary, sumo_home

log = logging.getLogger(__name__)

Backend = Literal["libsumo", "traci"]
BACKENDS: tuple[Backend, ...] = ("libsumo", "traci")
_libsumo_in_use = False


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Send the process's stderr (where libsumo's C++ prints SUMO errors) to a temp file.

    The yielded list holds the captured lines once the block ends; they are also logged at debug.
    """
    sys.stderr.flush()
    lines: list[str] = []
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines += capture.read().decode(errors="replace").splitlines()
    for line in lines:
        log.debug("sumo: %s", line)


@dataclass(frozen=True)
class EpisodeOutputs:
    """Files SUMO writes for the metrics of one episode."""

    tripinfo: Path
    statistics: Path


def sumo_command(scenario: Scenario, demand: str, seed: int, outputs: EpisodeOutputs | None,
                 end: float | None = None, gui: bool = False, time_to_teleport: float = 300.0,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """The SUMO command line for one episode of ``scenario`` under ``demand``."""
    regime = scenario.demand(demand)
    cmd = [sumo_binary("sumo-gui" if gui else "sumo"), "-n", str(scenario.net),
           "-r", ",".join(str(r) for r in regime.routes), "--begin", str(scenario.begin),
           "--end", str(end if end is not None else scenario.end), "--scale", str(regime.scale),
           "--seed", str(seed), "--time-to-teleport", str(time_to_teleport),
           "--no-step-log", "true", "--no-warnings", "true", "--duration-log.disable", "true"]
    if outputs is not None:
        cmd += ["--tripinfo-output", str(outputs.tripinfo), "--tripinfo-output.write-unfinished", "true",
                "--tripinfo-output.write-undeparted", "true", "--statistic-output", str(outputs.statistics)]
    if gui:
        cmd += ["--start", "true", "--quit-on-end", "true"]
    return [*cmd, *extra]


class Simulation:
    """Starts, steps and closes SUMO, turning its failures into one-line :class:`RELEDError`."""

    def __init__(self, backend: Backend = "libsumo", label: str | None = None) -> None:
        if backend not in BACKENDS:
            raise RELEDError(f"unknown SUMO backend {backend!r}: choose libsumo or traci")
        self.backend = backend
        self.label = label or f"reled-{os.getpid()}-{id(self)}"
        self.api: Any = None
        self._exceptions: tuple[type[BaseException], ...] = ()

    @property
    def running(self) -> bool:
        return self.api is not None

    def start(self, cmd: list[str]) -> Any:
        """Start SUMO with ``cmd`` (closing any previous run) and return the TraCI-like API."""
        self.close()
        sumo_home()
        if self.backend == "libsumo":
            self.api = self._start_libsumo(cmd)
        else:
            self.api = self._start_traci(cmd)
        return self.api

    def _start_libsumo(self, cmd: list[str]) -> Any:
        global _libsumo_in_use
        if _libsumo_in_use:
            raise RELEDError("libsumo runs one simulation per process and one is already running: "
                             "use --backend traci or separate worker processes")
        import libsumo

        self._exceptions = (libsumo.TraCIException, libsumo.FatalTraCIError)
        with captured_stderr() as messages:
            try:
                libsumo.start(cmd)
                failure = None
            except self._exceptions as exc:
                libsumo.close()
                failure = exc
        if failure is not None:
            reason = first_error_line("\n".join(messages)) if messages else str(failure)
            raise RELEDError(f"SUMO could not load the scenario: {reason}") from failure
        _libsumo_in_use = True
        return libsumo

    def _start_traci(self, cmd: list[str]) -> Any:
        import traci
        from traci.exceptions import FatalTraCIError, TraCIException

        self._exceptions = (TraCIException, FatalTraCIError)
        try:
            traci.start(cmd, label=self.label, stdout=open(os.devnull, "w"))  # noqa: SIM115 - owned by traci
        except (FatalTraCIError, TraCIException, OSError) as exc:
            raise RELEDError(f"SUMO could not load the scenario ({exc}); run the command "
                             f"`{' '.join(cmd[:5])} ...` by hand to see SUMO's reason") from exc
        return traci.getConnection(self.label)

    def step_to(self, time: float) -> None:
        """Advance SUMO to ``time`` seconds (several internal steps in one call)."""
        try:
            self.api.simulationStep(time)
        except self._exceptions as exc:
            self.close()
            raise RELEDError(f"SUMO stopped during the episode ({exc}); rerun with --backend traci "
                             "to see SUMO's log, or check the scenario files") from exc

    def guard(self, exc: BaseException) -> RELEDError:
        """Translate a SUMO failure raised by a query into a one-line error (and close)."""
        self.close()
        return RELEDError(f"SUMO stopped during the episode ({exc}); check the scenario files")

    @property
    def sumo_errors(self) -> tuple[type[BaseException], ...]:
        return self._exceptions

    def close(self) -> None:
        """Close SUMO; it then writes its end-of-run outputs (tripinfo of unfinished vehicles)."""
        global _libsumo_in_use
        if self.api is None:
            return
        try:
            self.api.close()
        except Exception as exc:
            log.debug("closing SUMO: %s", exc)
        if self.backend == "libsumo":
            _libsumo_in_use = False
        self.api = None
