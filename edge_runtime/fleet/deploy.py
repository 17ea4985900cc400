"""`reled-edge deploy`, `status` and `rollback`: push a signed model to devices and watch them take it.

The deploy publishes one retained, signed command per device, answers the devices' chunk requests,
and returns once every target reported COMMITTED on the new model, or with the reason each failed.
Canary devices go first; the rest only follow once all canaries committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.device.deploy_state import IN_PROGRESS, DeployState
from edge_runtime.device.device_config import DeviceConfig
from edge_runtime.errors import RELEDError
from edge_runtime.fleet.server import Model, ServerLink
from edge_runtime.mqtt import Message

DONE, FAILED, PENDING = "committed", "failed", "pending"
STAGED_DONE = "staged"  # the deploy's goal for a hardware-in-the-loop device: it commits during the next HIL run


@dataclass
class Target:
    device: str
    intersection: str
    seq: int = 0
    outcome: str = PENDING
    detail: str = ""
    progress: str = "waiting"
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0


def select_devices(fleet: dict[str, DeviceConfig], devices: list[str], group: str | None) -> list[DeviceConfig]:
    if group is not None:
        chosen = [c for c in fleet.values() if group in c.device.groups]
        if not chosen:
            raise RELEDError(f"no device file lists group {group!r}; groups: "
                             f"{sorted({g for c in fleet.values() for g in c.device.groups})}")
        return sorted(chosen, key=lambda c: c.id)
    if not devices:
        raise RELEDError("name the targets: --device ID (repeatable) or --group NAME")
    unknown = [d for d in devices if d not in fleet]
    if unknown:
        raise RELEDError(f"unknown device(s) {unknown}: known are {sorted(fleet)}")
    return [fleet[d] for d in devices]


def judge(target: Target, model: Model, reported: dict[str, Any] | None, until_staged: bool = False) -> None:
    """Update a target from the device's retained report (``until_staged``: a verified, staged model is enough)."""
    if reported is None or target.outcome != PENDING:
        return
    active = reported.get("active") or {}
    state = reported.get("state", "?")
    if reported.get("desired_seq", 0) > target.seq:
        target.outcome, target.detail = FAILED, "superseded by a newer command"
    elif active.get("sha256") == model.sha256 and state == DeployState.COMMITTED:
        target.outcome, target.detail = DONE, f"policy v{model.policy_version} committed"
    elif until_staged and state == DeployState.STAGED and (reported.get("job") or {}).get("sha256") == model.sha256:
        target.outcome, target.detail = STAGED_DONE, f"policy v{model.policy_version} staged: swapped in and " \
            "judged on probation at its next decisions"
    elif reported.get("error_seq") == target.seq and reported.get("error") and \
            state not in IN_PROGRESS:
        target.outcome, target.detail = FAILED, reported["error"]
    else:
        job = reported.get("job") or {}
        detail = ""
        if job.get("sha256") == model.sha256:
            detail = f" {job.get('chunks_have')}/{job.get('chunks_total')} chunks"
            if state == DeployState.PROBATION and job.get("probation_needed"):
                detail = f" {job.get('probation_decisions')}/{job['probation_needed']} decisions"
        target.progress = f"{state}{detail}"
        return
    target.seconds = time.monotonic() - target.started
    target.progress = state


def deploy(server: ServerLink, model: Model, configs: list[DeviceConfig], canary: int = 0, chunk_size: int = 65536,
           expires_in: float = 86400.0, timeout: float = 600.0,
           on_progress: Callable[[list[Target]], None] | None = None, until_staged: bool = False) -> list[Target]:
    """Deploy ``model`` to ``configs`` (canaries first); returns every target's outcome. ``until_staged``: done once
    the model is verified and staged (hardware-in-the-loop devices decide only while a HIL run drives them, so
    their probation, and the commit, happen during the next run).

    ``timeout`` bounds the time without progress (a chunk, a state, a probation decision), not the whole deploy:
    a model crawling over a slow link still arrives, a device that stopped answering is given up."""
    manifests = {c.id: model.manifest(c.device.intersection, chunk_size, expires_in) for c in configs}
    server.serve(model, chunk_size, [c.id for c in configs])
    targets = [Target(c.id, c.device.intersection) for c in configs]
    waves = [targets[:canary], targets[canary:]] if canary else [targets]
    for wave in waves:
        deadline = time.monotonic() + timeout
        for target in wave:
            target.started = time.monotonic()
            target.seq = server.command(target.device, {"kind": "deploy",
                                                        "manifest": manifests[target.device].to_dict()})
        while any(t.outcome == PENDING for t in wave):
            if time.monotonic() > deadline:
                for t in wave:
                    if t.outcome == PENDING:
                        t.outcome, t.detail = FAILED, f"no progress for {timeout:g} s (last: {t.progress})"
                break
            server.pump(0.05)
            invalid = server.invalid
            for t in wave:
                before = t.progress
                judge(t, model, server.reported.get(t.device), until_staged)
                if t.progress != before:
                    deadline = time.monotonic() + timeout
                if t.outcome == PENDING and t.device in invalid:
                    t.progress = f"invalid messages ({invalid[t.device]})"
            if on_progress is not None:
                on_progress(targets)
        if any(t.outcome == FAILED for t in wave) and wave is not waves[-1]:
            for t in waves[-1]:
                t.outcome, t.detail = FAILED, "not deployed: a canary failed"
            break
    return targets


def rollback(server: ServerLink, device: str, timeout: float = 60.0) -> dict[str, Any]:
    """Ask ``device`` to go back to its previous model; returns its report once it did."""
    seq = server.command(device, {"kind": "rollback"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.pump(0.05)
        reported = server.reported.get(device) or {}
        if reported.get("desired_seq", 0) >= seq and reported.get("state") == DeployState.ROLLED_BACK \
                and reported.get("error_seq") == seq:
            return reported
        if reported.get("error_seq") == seq and reported.get("state") != DeployState.ROLLED_BACK:
            raise RELEDError(f"{device} refused the rollback: {reported.get('error')}")
    why = f"its messages are invalid: {server.invalid[device]}" if device in server.invalid else "is it online?"
    raise RELEDError(f"{device} did not confirm the rollback within {timeout:g} s ({why})")


def fleet_snapshot(server: ServerLink, settle: float = 1.0,
                   on_message: Callable[[Message], None] | None = None) -> None:
    """Collect the retained reports, statuses and commands the broker holds (``on_message``: also sees the
    messages of the link's extra subscriptions)."""
    end = time.monotonic() + settle
    while time.monotonic() < end:
        server.pump(0.05, on_message)
