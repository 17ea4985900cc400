"""Environment settings from a TOML file, overridden by CLI flags; unknown keys are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import read_toml
from trainer.env import EnvConfig
from trainer.scenarios import DecisionTiming

ENV_KEYS = {f.name for f in dataclasses.fields(EnvConfig)} - {"timing", "sumo_args"}
TIMING_KEYS = {f.name for f in dataclasses.fields(DecisionTiming)}


def load_env_config(path: Path | None, **flags: Any) -> EnvConfig:
    """Build an EnvConfig: file values first, then every flag that is not None."""
    values: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path)
        env = dict(data.pop("env", {}))
        timing = dict(data.pop("timing", {}))
        if data:
            raise RELEDError(f"config file {path}: unknown section(s) {sorted(data)}; expected [env] and [timing]")
        check_keys(path, "env", env, ENV_KEYS)
        check_keys(path, "timing", timing, TIMING_KEYS)
        values.update(env)
    timing.update({k: v for k, v in flags.pop("timing", {}).items() if v is not None})
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return EnvConfig(**values, timing=DecisionTiming(**timing) if timing else None)
    except TypeError as exc:
        raise RELEDError(f"bad configuration value: {exc}") from exc


def check_keys(path: Path, section: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise RELEDError(f"config file {path}: unknown key(s) {unknown} in [{section}]; "
                         f"allowed: {', '.join(sorted(allowed))}")
