"""Checkpoints: the learner's full state plus what it was trained on, written atomically.

Loading refuses, with a one-line reason, a file that is not a RELED checkpoint, one written for
another observation schema, and one trained on another scenario (its agents and phases differ), so
a mismatch is never discovered as a tensor shape error.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_size
from edge_runtime.fileio import atomic_path, write_durably
from trainer.marl.networks import Actor
from trainer.scenarios import scenario_identity

FORMAT = "reled-marl-checkpoint/1"


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``path`` atomically: on any failure (a full disk) the previous file stays intact."""
    buffer = io.BytesIO()  # torch.save turns write errors into RuntimeErrors; serialize first, then write
    torch.save({"format": FORMAT, "schema_version": SCHEMA_VERSION, "feature_size": feature_size(),
                "max_phases": MAX_PHASES, **payload}, buffer)
    try:
        with atomic_path(path) as tmp:
            write_durably(tmp, buffer.getbuffer())
    except OSError as exc:
        raise RELEDError(f"could not write checkpoint {path}: {exc.strerror or exc}; "
                         "the previous checkpoint is intact (free some space and --resume)") from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise RELEDError(f"{path} is a folder: give a checkpoint file such as {path / 'best.pt'}")
    if not path.is_file():
        raise RELEDError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise RELEDError(f"{path} is not a RELED checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RELEDError(f"{path} is not a RELED checkpoint (expected format {FORMAT})")
    if data["schema_version"] != SCHEMA_VERSION or data["feature_size"] != feature_size() \
            or data["max_phases"] != MAX_PHASES:
        raise RELEDError(f"{path} was trained on observation schema v{data['schema_version']} "
                         f"({data['feature_size']} features, {data['max_phases']} phases); this RELED uses "
                         f"v{SCHEMA_VERSION} ({feature_size()} features, {MAX_PHASES} phases): retrain the policy")
    return data


def trained_here(data: dict[str, Any], scenario: str, agents: list[str], n_phases: list[int]) -> bool:
    """Whether the checkpoint was trained on these intersections: the same scenario (by its identity, however
    it is named: a folder by relative or absolute path), the same lights and phases."""
    return (scenario_identity(data["scenario"]) == scenario_identity(scenario) and data["agents"] == agents
            and data["n_phases"] == n_phases)


def check_scenario(data: dict[str, Any], path: Path, scenario: str, agents: list[str], n_phases: list[int],
                   other_use: str = "train a policy for this scenario") -> None:
    """Refuse a checkpoint trained on other intersections than the ones it would now control."""
    if not trained_here(data, scenario, agents, n_phases):
        raise RELEDError(f"{path} was trained on scenario {data['scenario']} ({len(data['agents'])} lights), "
                         f"not on {scenario} ({len(agents)} lights): evaluate it on {data['scenario']}, "
                         f"or {other_use}")


def actor_from_checkpoint(data: dict[str, Any]) -> Actor:
    ppo = data["config"]["ppo"]
    actor = Actor(ppo["hidden"], ppo["layers"], ppo["normalize_obs"])
    actor.load_state_dict(data["learner"]["actor"])
    return actor.eval()
