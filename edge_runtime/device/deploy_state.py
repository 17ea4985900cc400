"""The controller's deployment state, persisted (atomically, fsync'd) before every step it takes.

IDLE → DOWNLOADING → VERIFIED → STAGED → PROBATION → COMMITTED, or FAILED / ROLLED_BACK; every allowed
move is in :data:`TRANSITIONS` (docs/edge.md §4 draws it), and entering a state the table does not allow
from the current one raises :class:`IllegalTransition`: that is a bug in the controller, never a bad input.
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

from edge_runtime.fileio import atomic_write_text
from edge_runtime.protocol import Manifest


class DeployState(str, enum.Enum):
    """A state's name is its value, in files, reports and f-strings alike (``enum.StrEnum`` is Python 3.11+)."""

    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFIED = "VERIFIED"
    STAGED = "STAGED"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"

    def __str__(self) -> str:
        return self.value


_S = DeployState
# Every state the controller may enter from each state. Why each move exists:
# - DOWNLOADING from anywhere a command is handled: a newer signed deploy replaces whatever was going on.
# - COMMITTED from those states too: a deploy of the model already running is a no-op that confirms it.
# - ROLLED_BACK from those states: a signed rollback command, and (from PROBATION) a failed probation
#   or a restart during probation.
# - PROBATION always ends in a judgement: a deploy arriving meanwhile waits for it (the same model sent
#   again changes nothing), so PROBATION leads only to COMMITTED or ROLLED_BACK.
# - VERIFIED and STAGED are checked again after a restart, so STAGED → STAGED; with no job in the file
#   (never written by this code) they fall back to IDLE.
# VERIFIED handles no commands: it is entered and left within one step (a restart resumes from it).
TRANSITIONS: dict[DeployState, frozenset[DeployState]] = {
    _S.IDLE: frozenset({_S.DOWNLOADING, _S.COMMITTED, _S.ROLLED_BACK}),
    _S.DOWNLOADING: frozenset({_S.DOWNLOADING, _S.VERIFIED, _S.FAILED, _S.COMMITTED, _S.ROLLED_BACK}),
    _S.VERIFIED: frozenset({_S.STAGED, _S.FAILED, _S.IDLE}),
    _S.STAGED: frozenset({_S.STAGED, _S.PROBATION, _S.FAILED, _S.IDLE, _S.DOWNLOADING, _S.COMMITTED, _S.ROLLED_BACK}),
    _S.PROBATION: frozenset({_S.COMMITTED, _S.ROLLED_BACK}),
    _S.COMMITTED: frozenset({_S.DOWNLOADING, _S.COMMITTED, _S.ROLLED_BACK}),
    _S.FAILED: frozenset({_S.DOWNLOADING, _S.COMMITTED, _S.ROLLED_BACK}),
    _S.ROLLED_BACK: frozenset({_S.DOWNLOADING, _S.COMMITTED, _S.ROLLED_BACK}),
}
# A deployment still under way: the server waits for these to end before judging a device.
IN_PROGRESS = frozenset({_S.DOWNLOADING, _S.VERIFIED, _S.STAGED, _S.PROBATION})


class IllegalTransition(RuntimeError):
    """The controller tried a move :data:`TRANSITIONS` does not allow: a bug, so it is not a RELEDError."""


def check_transition(old: DeployState, new: DeployState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"deploy state {old} → {new} is not an allowed transition")


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
    high_water: int = 0  # highest policy version ever committed (anti-rollback)
    desired_seq: int = 0  # last signed command handled
    newest_issued: float = 0.0  # issue time of the newest command handled: the clock is at least this
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
        atomic_write_text(self.path, state.to_json(), durable=True)
