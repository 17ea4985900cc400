"""`python -m edge_runtime.device --config FILE`: the controller daemon, without the command line's libraries.

`reled-edge daemon --config FILE` checks the file and then becomes this process (exec, same pid), so a
controller that runs for months does not carry typer, rich and the pydantic that typer loads (about 10 MB
of its resident memory, measured by tools/bench/edge_soak.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from edge_runtime.errors import RELEDError
from edge_runtime.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime.device",
                                     description="Run one intersection controller (what `reled-edge daemon` runs).")
    parser.add_argument("--config", type=Path, required=True, help="the device file")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from edge_runtime.device.daemon import DeviceDaemon
    from edge_runtime.device.device_config import load_device_config

    try:
        controller = DeviceDaemon(load_device_config(args.config))
    except RELEDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: controller.stop())
    signal.signal(signal.SIGINT, lambda *_: controller.stop())
    controller.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
