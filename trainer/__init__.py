"""RELED trainer: scenarios, the multi-agent SUMO environment, controllers, MARL, SED and export."""

from edge_runtime import __version__

__all__ = ["__version__"]
