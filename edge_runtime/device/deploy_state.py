"""The controller's deployment state, persisted (atomically, fsync'd) before every step it takes.

IDLE → DOWNLOADING → VERIFIED → STAGED → PROBATION → COMMITTED, or FAILED / ROLLED_BACK (DESIGN §6).
A restart resumes from the file: a download continues with the chunks it has, a verified or staged
model is checked again, and a restart during probation counts as a failed probation (the new model
may be what crashed us), so it rolls back.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.fileio import atomic_path, write_durably
from edge_runtime.protocol import Manifest


class DeployState(enum.StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFIED = "VERIFIED"
    STAGED = "STAGED"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"


@dataclass
class ModelRef:
    sha256: str
    policy_version: int


@dataclass
class Job:
    """The deployment in progress: its manifest and which chunks are on disk."""

    manifest: dict[str, Any]
    seq: int
    have: list[bool]
    bad_chunks: int = 0
    probation_decisions: int = 0
    probation_failures: int = 0

    @property
    def parsed(self) -> Manifest:
        return Manifest.from_dict(self.manifest)


@dataclass
class ControllerState:
    state: DeployState = DeployState.IDLE
    active: ModelRef | None = None
    previous: list[ModelRef] = field(default_factory=list)  # newest first
    high_water: int = 0  # highest policy version ever verified (anti-rollback)
    desired_seq: int = 0  # last signed command handled
    job: Job | None = None
    error: str = ""  # why the last command was refused or the last deployment failed
    error_seq: int = 0  # the command that error belongs to

    def to_json(self) -> str:
        data = asdict(self)
        data["state"] = str(self.state)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ControllerState:
        data = json.loads(text)
        job = data.pop("job")
        active = data.pop("active")
        previous = data.pop("previous")
        return cls(state=DeployState(data.pop("state")), active=ModelRef(**active) if active else None,
                   previous=[ModelRef(**p) for p in previous], job=Job(**job) if job else None, **data)


class StateFile:
    def __init__(self, path: Path):
        self.path = path

    def load(self) -> ControllerState:
        if not self.path.exists():
            return ControllerState()
        return ControllerState.from_json(self.path.read_text())

    def save(self, state: ControllerState) -> None:
        with atomic_path(self.path) as tmp:
            write_durably(tmp, state.to_json().encode())
