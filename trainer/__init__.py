"""RELED trainer: scenarios, the multi-agent SUMO environment, controllers and evaluation."""

__version__ = "0.1.0"
