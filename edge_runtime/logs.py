"""Logging as every RELED process sets it up: one line per record on stderr, paho's chatter only when verbose."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("edge_runtime.mqtt").setLevel(logging.DEBUG if verbose else logging.WARNING)
