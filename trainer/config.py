"""Environment settings from a TOML file (``[env]``, ``[timing]``), overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_runtime.settings import build_section, read_sections, section_values, settings_keys
from trainer.env import EnvConfig
from trainer.scenarios import DecisionTiming

ENV_KEYS = settings_keys(EnvConfig, exclude=("timing", "sumo_args"))


def load_env_config(path: Path | None, **flags: Any) -> EnvConfig:
    """Build an EnvConfig: file values first, then every flag that is not None."""
    sections: dict[str, dict[str, Any]] = {"env": {}, "timing": {}}
    if path is not None:
        sections.update(read_sections(path, sections))
    source = f"config file {path}" if path is not None else "flags"
    env = section_values(source, "env", sections["env"], EnvConfig, allowed=ENV_KEYS)
    timing = section_values(source, "timing", sections["timing"], DecisionTiming)
    timing.update({k: v for k, v in flags.pop("timing", {}).items() if v is not None})
    env.update({k: v for k, v in flags.items() if v is not None})
    timing_cfg = build_section(source, "timing", timing, DecisionTiming) if timing else None
    return build_section(source, "env", env, EnvConfig, allowed=ENV_KEYS | set(flags), timing=timing_cfg)
