"""RELED trainer: scenarios, the multi-agent SUMO environment, controllers, MARL, SED and export.

The trainer needs Python 3.11 (it is built and tested there, with torch, SUMO and llama.cpp pinned for it);
the controller (`edge_runtime`, `reled-edge`) also runs on 3.10, a Jetson's Python, which is why the
distribution asks for 3.10 only. So an older Python is stopped here with one line, not deep in a stack.
"""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 (the distribution allows 3.10 for the controller)
    sys.stderr.write(f"error: the trainer (`reled`) needs Python 3.11 or newer, this is {sys.version.split()[0]}; "
                     "the controller (`reled-edge`) runs on 3.10\n")
    raise SystemExit(2)

from edge_runtime import __version__

__all__ = ["__version__"]
