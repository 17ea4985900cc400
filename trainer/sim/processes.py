"""What every SUMO worker process shares: how it stops on SIGTERM and how its parent stops it.

libsumo runs one simulation per process, so rollout workers and look-ahead workers are processes;
either way no SUMO may outlive the run.
"""

from __future__ import annotations

import contextlib
import signal
import time
from multiprocessing.connection import Connection
from typing import Any


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # unwinds through ``finally`` so the env closes SUMO (TraCI's is a child process)


def worker_signals() -> None:
    """In a worker: Ctrl-C is the parent's business; SIGTERM closes SUMO on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def stop_workers(workers: list[tuple[Any, Connection]], grace_s: float = 10.0) -> None:
    """Ask every (process, connection) to stop, then terminate and finally kill what is left."""
    for _process, conn in workers:
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("close",))
    deadline = time.monotonic() + grace_s
    for process, conn in workers:
        process.join(timeout=max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
        conn.close()
