"""RELED edge runtime: what an intersection controller runs (no torch, no SUMO).

The trainer imports the same shield and feature schema, so a policy sees the same
observation and the signal obeys the same safety rules in simulation and on the street.
"""

__version__ = "0.1.0"
