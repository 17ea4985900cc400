"""`reled loop`: the closed loop from the street back to training, one cycle at a time, on a HIL fleet.

A cycle:

1. **street**: a HIL run with the active model on every device; the devices record each decision in their
   outbox and the fleet's collector writes the batches (exactly once) under ``FLEET/rollouts``;
2. **accounting**: once every outbox is empty, the rows the devices say they recorded since the last cycle are
   matched against the rows collected (lost = recorded − collected) and handed to the update, which counts each
   one as kept or dropped with its reason (duplicates included): nothing disappears unaccounted;
3. **update**: :func:`~trainer.marl.street_update.update_from_street` trains a copy of the current run on those
   rows mixed with simulation (off-policy corrected), and the result is exported with the next policy version;
4. **canary**: the new model goes to one device; a second HIL run on the same seed (the canary on the new
   model, the rest on the active one) must keep the delay within ``margin`` of the active model's, with no
   safety violation and the canary committed; then the rest of the fleet gets it (committed during the next
   HIL run), else the canary is rolled back and the next cycle starts again from the previous run.

``LOOP/loop.json`` records every finished cycle, so `reled loop` continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.device.device_config import DeviceConfig, device_files
from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_write_text
from edge_runtime.fleet.deploy import FAILED, deploy, rollback
from edge_runtime.fleet.local import read_record
from edge_runtime.fleet.server import Model, ServerLink, server_address
from edge_runtime.keys import KeyFolder
from edge_runtime.policy import OnnxPolicy
from edge_runtime.rollouts import COLUMNS
from trainer.hil.run import HilReport, HilSettings, run_hil

log = logging.getLogger(__name__)
LOOP_FILE = "loop.json"
HOLDOUT_DECISIONS = 180  # decisions of the simulated episode whose states compare the policy before and after
Progress = Callable[[str], None]


@dataclass(frozen=True)
class LoopSettings:
    run: Path  # the training run the fleet's model came from (IPPO or RELED)
    fleet: Path  # a `reled-edge fleet up --hil` folder with a collector
    out: Path  # the loop's folder: loop.json, and per cycle its rollouts, run copy, model and HIL reports
    cycles: int = 1  # cycles to have finished when the command returns (finished ones are not run again)
    canary: str | None = None  # None: the first device
    margin: float = 0.05  # the canary's delay may exceed the active model's by this fraction at most (< 0: must gain)
    confirm: bool = True  # after the canary, a HIL run with the whole fleet on the new model must pass the same gate
    speed: float | None = None  # HIL pacing (None: as fast as the devices answer)
    seed: int = 0  # SUMO seed of both HIL runs of a cycle (the same traffic, so the comparison is paired)
    demand: str = "moderate"
    episode_seconds: float | None = None
    deadline_ms: float = 250.0
    updates: int = 1
    street_share: float = 0.5
    rho_max: float = 1.0
    flush_timeout: float = 120.0  # seconds to wait for the devices' outboxes to empty after a run


class Fleet:
    """The loop's view of the fleet: its device files, its collector's folder, a server connection."""

    def __init__(self, folder: Path):
        record = read_record(folder)
        if record is None or not record.get("hil"):
            raise RELEDError(f"{folder} is not a hardware-in-the-loop fleet: start one with `reled-edge fleet up "
                             "--hil --model POLICY.onnx --dir DIR`")
        if not isinstance(record.get("collector"), dict):
            raise RELEDError(f"the fleet in {folder} runs no collector, so its rollouts never come back: start it "
                             "with `reled-edge fleet up --hil --collect`")
        self.folder = folder
        self.record = record
        self.rollouts = folder / record["collector"]["out"]
        self.configs: dict[str, DeviceConfig] = {c.id: c for c in device_files(folder / "devices").values() if c.hil}
        keys = KeyFolder(folder / "keys")
        self.server = ServerLink(keys, server_address(keys, folder / "broker", None, None), "loop").start()

    def close(self) -> None:
        self.server.close()

    @property
    def lights(self) -> dict[str, str]:
        """device id → light id."""
        return {device: config.device.intersection for device, config in self.configs.items()}

    def reports(self, wanted: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, dict]:
        """Every device's report, once each satisfies ``wanted``."""
        deadline = time.monotonic() + timeout
        while True:
            self.server.pump(0.05)
            reports = {d: self.server.reported.get(d) or {} for d in self.configs}
            if all(wanted(r) for r in reports.values()):
                return reports
            if time.monotonic() > deadline:
                late = sorted(d for d, r in reports.items() if not wanted(r))
                raise RELEDError(f"timed out after {timeout:g} s waiting for {what} on {late}")

    def recorded(self, timeout: float) -> dict[str, list[int]]:
        """Per device [outbox epoch, rows recorded in it], from a report sent after now, once its outbox holds
        no row the collector has not acknowledged."""
        after = time.time()
        reports = self.reports(lambda r: r.get("ts", 0) > after and r.get("outbox_rows") == 0 and
                               r.get("decisions") is not None, timeout, "every outbox to be emptied by the collector")
        return {device: [int(r.get("outbox_epoch") or 0), int(r["decisions"])] for device, r in reports.items()}

    def batch_files(self) -> set[str]:
        return {str(p.relative_to(self.rollouts)) for p in self.rollouts.glob("*/*/*.npz")}

    def deploy(self, model: Path, devices: list[str]) -> None:
        """``model`` verified and staged on ``devices`` (HIL devices commit it during the next run)."""
        targets = deploy(self.server, Model.load(model), [self.configs[d] for d in devices], timeout=120.0,
                         until_staged=True)
        failed = [f"{t.device}: {t.detail}" for t in targets if t.outcome == FAILED]
        if failed:
            raise RELEDError(f"deploying {model.name} failed on {'; '.join(failed)}")

    def committed(self, devices: list[str], sha256: str) -> bool:
        """Whether each of ``devices`` reports ``sha256`` active and COMMITTED."""
        return all((a := self.active(d)).get("sha256") == sha256 and a.get("state") == "COMMITTED" for d in devices)

    def active(self, device: str) -> dict[str, Any]:
        self.server.pump(0.2)
        report = self.server.reported.get(device) or {}
        return {"state": report.get("state"), **(report.get("active") or {})}


def recorded_since(now: dict[str, list[int]], before: dict[str, list[int]]) -> int:
    """Rows recorded between two readings; a device whose outbox was recreated (a new epoch) counts from 0."""
    total = 0
    for device, (epoch, rows) in now.items():
        base_epoch, base_rows = before.get(device, (epoch, 0))
        total += rows - base_rows if base_epoch == epoch else rows
    return total


def fallback_spans(*reports: HilReport) -> dict[str, list[list[float]]]:
    """Per device, the simulated-time spans whose decisions the plant did not take from it (missing, late or
    invalid answers): what it recorded there never reached the heads."""
    spans: dict[str, list[list[float]]] = {}
    for report in reports:
        for event in report.events:
            spans.setdefault(event["device"], []).append([event["first_t"], event["last_t"]])
    return spans


def held_out_states(run: Path, decisions: int = HOLDOUT_DECISIONS) -> tuple[np.ndarray, np.ndarray]:
    """Observations (and masks) of a simulated episode the run's current policy drives on a seed no update plays:
    where the policy before and after an update are compared (the street rows are nearly all used by it)."""
    from trainer.export import collect_holdout
    from trainer.marl.checkpoint import actor_from_checkpoint, load_checkpoint

    data = load_checkpoint(run / "latest.pt")
    obs, masks, *_ = collect_holdout(actor_from_checkpoint(data), data["scenario"], data["demand"], decisions,
                                     data["config"].get("timing"))
    return obs, masks


def merge_spans(*parts: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
    return {d: [span for part in parts for span in part.get(d, [])] for d in {d for part in parts for d in part}}


def rows_in(folder: Path, files: set[str]) -> int:
    total = 0
    for name in files:
        with np.load(folder / name, allow_pickle=False) as data:
            total += len(data[next(iter(COLUMNS))])
    return total


def copy_batches(source: Path, files: set[str], target: Path) -> None:
    """The cycle's batches, hard-linked (copied across file systems) into the cycle's own rollouts folder."""
    for name in sorted(files):
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / name, dest)
        except OSError:
            shutil.copy2(source / name, dest)


def hil_summary(report: HilReport) -> dict[str, Any]:
    return {"avg_delay": report.metrics["avg_delay"], "avg_travel_time": report.metrics["avg_travel_time"],
            "throughput": report.metrics["throughput"], "violations": report.total_violations,
            "missing": sum(d["missing"] for d in report.devices.values()), "decisions": report.decisions,
            "wall_seconds": report.wall_seconds}


def judge_trial(active_delay: float, trial_delay: float, violations: int, committed: bool,
                margin: float) -> dict[str, Any]:
    """The gate of a trial run (the canary on the new model, or then the whole fleet): it keeps the delay within
    ``margin`` (a fraction) of the active model's on the same traffic, shows no unsafe state, and every device
    the model went to committed it during the run."""
    limit = active_delay * (1 + margin)
    reasons = [why for bad, why in (
        (not trial_delay <= limit, f"delay {trial_delay:.2f} s > {limit:.2f} s (active {active_delay:.2f} s + "
                                   f"{margin:.0%})"),
        (violations > 0, f"{violations} safety violations"),
        (not committed, "a device did not commit the new model during the run"),
    ) if bad]
    return {"passed": not reasons, "reasons": reasons, "active_delay": active_delay, "trial_delay": trial_delay,
            "limit": limit, "margin": margin}


class Loop:
    """The loop's state (``LOOP/loop.json``) and its cycles."""

    def __init__(self, settings: LoopSettings, progress: Progress = log.info):
        self.settings = settings
        self.progress = progress
        self.path = settings.out / LOOP_FILE
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
            given = (str(settings.fleet.resolve()), str(settings.run.resolve()))
            if (self.state["fleet"], self.state["run"]) != given:
                raise RELEDError(f"{settings.out} is the loop of run {self.state['run']} on fleet "
                                 f"{self.state['fleet']}: give those --run and --fleet to continue it, or a new --out")
        else:
            self.state = {"run": str(settings.run.resolve()), "fleet": str(settings.fleet.resolve()),
                          "current_run": str(settings.run.resolve()), "active_model": None, "versions": [],
                          "recorded": None, "seen": None, "not_applied": {}, "pending": None, "cycles": []}

    def save(self) -> None:
        self.settings.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.state, indent=1) + "\n")

    def run(self) -> list[dict[str, Any]]:
        """Cycles until ``settings.cycles`` are finished; returns every cycle's record."""
        fleet = Fleet(self.settings.fleet)
        try:
            self._start(fleet)
            while len(self.state["cycles"]) < self.settings.cycles:
                self.state["cycles"].append(self._cycle(fleet, len(self.state["cycles"]) + 1))
                self.save()
        finally:
            fleet.close()
        return self.state["cycles"]

    def _start(self, fleet: Fleet) -> None:
        """On the first cycle: the fleet's model is the active one, and the rows already recorded and collected
        before the loop are not the loop's (an accounting baseline)."""
        if self.state["active_model"] is None:
            model = Path(fleet.record["model"])
            self.state["active_model"] = str(model)
            self.state["versions"] = [OnnxPolicy(model).meta.policy_version]
        if self.state["recorded"] is None:
            self.state["recorded"] = fleet.recorded(self.settings.flush_timeout)
            self.state["seen"] = sorted(fleet.batch_files())
        self.save()

    def _settle_trial(self, fleet: Fleet) -> None:
        """A cycle that stopped between a trial deploy and its verdict left an untested model on some devices: roll
        them back, so the next active run is the active model's."""
        pending = self.state.get("pending")
        if not pending:
            return
        for device in pending["devices"]:
            if fleet.active(device).get("policy_version") == pending["policy_version"]:
                self.progress(f"an unfinished cycle left v{pending['policy_version']} on {device}: rolling back")
                rollback(fleet.server, device)
        self.state["pending"] = None
        self.save()

    def _hil(self, folder: Path) -> HilReport:
        from trainer.hil.report import write_report
        from trainer.marl.run_folder import read_config

        s = self.settings
        config = read_config(Path(self.state["current_run"]))
        report = run_hil(HilSettings(scenario=config.scenario, fleet=s.fleet.resolve(), speed=s.speed,
                                     demand=s.demand, seed=s.seed, deadline_ms=s.deadline_ms,
                                     episode_seconds=s.episode_seconds))
        write_report(report, folder)
        return report

    def _cycle(self, fleet: Fleet, number: int) -> dict[str, Any]:
        from trainer.export import ExportRequest, export_policy
        from trainer.marl.street_update import update_from_street

        s, state = self.settings, self.state
        folder = s.out / f"cycle{number}"
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished cycle starts again
        folder.mkdir(parents=True)
        devices = sorted(fleet.configs)
        canary = s.canary or devices[0]
        if canary not in fleet.configs:
            raise RELEDError(f"--canary {canary!r} is not a HIL device of the fleet: choose one of {devices}")

        self._settle_trial(fleet)
        self.progress(f"cycle {number}: HIL run, the active model on every device")
        active = self._hil(folder / "hil_active")
        recorded = fleet.recorded(s.flush_timeout)
        new_files = fleet.batch_files() - set(state["seen"])
        rows = {"recorded": recorded_since(recorded, state["recorded"]),
                "collected": rows_in(fleet.rollouts, new_files), "batches": len(new_files)}
        rows["lost"] = rows["recorded"] - rows["collected"]
        copy_batches(fleet.rollouts, new_files, folder / "rollouts")
        state["recorded"], state["seen"] = recorded, sorted(set(state["seen"]) | new_files)

        self.progress(f"cycle {number}: update on {rows['collected']} street rows mixed with simulation")
        not_applied = merge_spans(state.get("not_applied") or {}, fallback_spans(active))
        update = update_from_street(Path(state["current_run"]), folder / "rollouts", fleet.lights,
                                    state["versions"], updates=s.updates, street_share=s.street_share,
                                    rho_max=s.rho_max, out=folder / "run", not_applied=not_applied,
                                    holdout=held_out_states(Path(state["current_run"])))
        rows.update(read=update.read, kept=update.kept, dropped=update.dropped,
                    dropped_by_reason={k: v for k, v in update.counts.items() if v and k != "kept"})
        version = max(state["versions"]) + 1
        model = folder / "policy.onnx"
        self.progress(f"cycle {number}: export policy v{version}")
        export_policy(ExportRequest(out=model, run=folder / "run" / "latest.pt", policy_version=version,
                                    holdout_decisions=60))
        state["versions"].append(version)
        state["pending"] = {"devices": [canary], "model": str(model), "policy_version": version}
        self.save()  # a crash from here on: the next start rolls the trial devices back first (_settle_trial)

        self.progress(f"cycle {number}: canary {canary} gets v{version}; HIL run on the same seed")
        fleet.deploy(model, [canary])
        trial = self._hil(folder / "hil_canary")
        state["not_applied"] = fallback_spans(trial)  # the canary run's rows are the next cycle's
        sha = Model.load(model).sha256
        gate = judge_trial(active.metrics["avg_delay"], trial.metrics["avg_delay"], trial.total_violations,
                           fleet.committed([canary], sha), s.margin)
        confirmation, fleet_run = None, None
        if gate["passed"]:
            rest = [d for d in devices if d != canary]
            self.progress(f"cycle {number}: canary gate passed; v{version} to {len(rest)} more device(s)")
            if rest:
                state["pending"]["devices"] = devices
                self.save()
                fleet.deploy(model, rest)
            if s.confirm and rest:
                self.progress(f"cycle {number}: the whole fleet on v{version}: confirming HIL run on the same seed")
                whole = self._hil(folder / "hil_fleet")
                state["not_applied"] = merge_spans(state["not_applied"], fallback_spans(whole))
                fleet_run = hil_summary(whole)
                confirmation = judge_trial(active.metrics["avg_delay"], whole.metrics["avg_delay"],
                                           whole.total_violations, fleet.committed(devices, sha), s.margin)
        trials = [gate, *([confirmation] if confirmation else [])]
        passed = all(t["passed"] for t in trials)
        if passed:
            state["active_model"], state["current_run"] = str(model), str(folder / "run")
        else:
            back = devices if confirmation else [canary]
            why = "; ".join(trials[-1]["reasons"])
            self.progress(f"cycle {number}: {'fleet-wide run' if confirmation else 'canary gate'} refused ({why}); "
                          f"rolling {len(back)} device(s) back")
            for device in back:
                rollback(fleet.server, device)
        state["pending"] = None
        return {"cycle": number, "policy_version": version, "model": str(model), "canary": canary,
                "rows": rows, "update": {k: v for k, v in update.as_dict().items() if k not in ("counts", "run")},
                "active": hil_summary(active), "canary_run": hil_summary(trial), "gate": gate,
                "fleet_run": fleet_run, "confirmation": confirmation, "adopted": passed}


def run_loop(settings: LoopSettings, progress: Progress = log.info) -> list[dict[str, Any]]:
    if settings.cycles < 1 or not settings.margin > -1:
        raise RELEDError(f"--cycles must be >= 1 (got {settings.cycles}) and --margin > -1 (got {settings.margin}; "
                         "a negative margin asks for an improvement)")
    return Loop(replace(settings, fleet=settings.fleet.resolve(), out=settings.out.resolve()), progress).run()

