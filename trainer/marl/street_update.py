"""`reled update`: the closed loop's learning step, a run trained further on its controllers' street rollouts.

Each update plays the run's usual simulated episodes and adds the screened, V-trace-corrected street
transitions (``trainer.marl.street``) to the batch, at most ``street_share`` of its agent rows, then
checkpoints latest.pt and best.pt so that `reled export --run` exports the updated policy. The report says
what was read and kept, and how far the policy moved (docs/training.md, "Street rollouts (closed loop)").
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import RELEDError
from trainer.marl.networks import Actor
from trainer.marl.ppo import PPOLearner
from trainer.marl.run_folder import read_config
from trainer.marl.storage import RolloutBatch
from trainer.marl.street import KEPT, RowCounts, RunLights, StreetRows, screen, street_batch
from trainer.marl.training import TrainingRun, UpdateHook


@dataclass(frozen=True)
class UpdateReport(RowCounts):
    """What one `reled update` read, kept and used, and how far the policy moved."""

    run: Path  # the updated run folder
    counts: dict[str, int]  # rows by outcome: "kept" and every reason of trainer.marl.street.REASONS
    unreadable: list[str]  # files none of whose rows could be read
    sequences: int  # the kept rows' decision sequences
    transitions: int  # kept rows with a next decision in their sequence: what an update can use
    street_rows: list[int]  # per update, street rows in the batch
    street_share: list[float]  # per update, their share of the batch's agent rows
    rho_mean: float | None  # mean truncated importance weight of the rows used
    rho_clipped_fraction: float | None  # share of the rows used whose π/μ exceeded ρ̄
    param_distance: float  # L2 distance between the actor's parameters before and after
    param_norm: float  # L2 norm of the actor's parameters before (the distance's scale)
    disagreement: float  # share of held-out observations whose greedy phase changed
    holdout: int  # held-out observations
    holdout_source: str  # "street rows not used" or "given"
    eval_delay: float | None  # the updated policy's greedy evaluation delay in simulation (s)
    updates: int  # the run's updates so far

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "run": str(self.run), "read": self.read, "dropped": self.dropped}


class StreetMix:
    """Adds the street transitions to each update's batch (a ``BatchExtension``): recomputed under the current
    networks every update, capped at ``share`` of the batch's agent rows by a uniform subsample."""

    def __init__(self, street: StreetRows, share: float, rho_max: float, rng: np.random.Generator):
        self.street, self.share, self.rho_max, self.rng = street, share, rho_max, rng
        self.used = np.zeros(len(street.transitions), dtype=bool)
        self.rho: list[np.ndarray] = []
        self.clipped: list[np.ndarray] = []

    def __call__(self, learner: PPOLearner, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, Any]]:
        street = street_batch(learner, self.street, self.rho_max)
        simulated = int((~batch.from_expert).sum())
        cap = int(self.share / (1 - self.share) * simulated)  # street / (street + simulated) <= share
        n = len(street.rho)
        pick = np.arange(n) if n <= cap else np.sort(self.rng.choice(n, cap, replace=False))
        self.used[pick] = True
        self.rho.append(street.rho[pick])
        self.clipped.append(street.clipped[pick])
        stats = {"street_rows": len(pick), "street_share": len(pick) / (len(pick) + simulated),
                 "rho_mean": _mean(street.rho[pick]), "rho_clipped_fraction": _mean(street.clipped[pick])}
        return RolloutBatch.concat([batch, street.rows.rows(torch.from_numpy(pick))]), stats


def update_from_street(run_folder: Path, rollouts_dir: Path, devices: Mapping[str, str], versions: Collection[int],
                       *, updates: int = 1, street_share: float = 0.5, rho_max: float = 1.0, fallback: bool = True,
                       out: Path | None = None, workers: int | None = None,
                       holdout: tuple[np.ndarray, np.ndarray] | None = None,
                       on_update: UpdateHook | None = None,
                       not_applied: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> UpdateReport:
    """Train ``run_folder`` (or its copy ``out``) for ``updates`` more updates on the rollouts under
    ``rollouts_dir`` mixed with simulation.

    ``devices`` maps device id → light id; ``versions`` are the policy_versions of this run's exports (policy
    rows of any other model are dropped); ``fallback`` keeps the fixed-time rows. ``holdout`` (obs [K, F], masks
    [K, P]) is where the greedy actions before and after are compared; by default the street rows no update
    used. ``workers`` overrides the run's SUMO workers (results do not depend on it). ``not_applied``: per device,
    signal-time spans of decisions the heads never showed (dropped as ``not_applied``; `reled loop` passes its
    HIL runs' fallbacks).
    """
    if updates < 1 or not 0 < street_share < 1 or rho_max <= 0:
        raise RELEDError(f"--updates must be >= 1 (got {updates}), --street-share in (0, 1) (got {street_share}) "
                         f"and --rho-max > 0 (got {rho_max})")
    if not rollouts_dir.is_dir():
        raise RELEDError(f"rollouts folder {rollouts_dir} does not exist: give the collector's folder "
                         "(`reled-edge collect --out DIR`)")
    if read_config(run_folder).algo == "mappo":
        raise RELEDError(f"{run_folder} is a MAPPO run: its critic needs the global state, which street rollouts "
                         "do not record; update an IPPO or RELED run")
    if out is None:
        return _update(run_folder, rollouts_dir, devices, versions, updates, street_share, rho_max, fallback,
                       workers, holdout, on_update, not_applied)
    if out.exists() and any(out.iterdir()):
        raise RELEDError(f"--out {out} already exists: give a new folder, or leave --out out to update in place")
    shutil.copytree(run_folder, out, dirs_exist_ok=True)
    try:
        return _update(out, rollouts_dir, devices, versions, updates, street_share, rho_max, fallback, workers,
                       holdout, on_update, not_applied)
    except BaseException:  # a refused update leaves no half-made copy
        shutil.rmtree(out, ignore_errors=True)
        raise


def _update(folder: Path, rollouts_dir: Path, devices: Mapping[str, str], versions: Collection[int], updates: int,
            street_share: float, rho_max: float, fallback: bool, workers: int | None,
            holdout: tuple[np.ndarray, np.ndarray] | None, on_update: UpdateHook | None,
            not_applied: Mapping[str, Sequence[tuple[float, float]]] | None) -> UpdateReport:
    run = TrainingRun.resume(folder, workers=workers)
    screening = screen(rollouts_dir, RunLights(run.agents, run.n_phases), devices, versions, fallback, not_applied)
    street = StreetRows.from_screening(screening.rows, run.facts.timing["delta"])
    if not len(street.transitions):
        dropped = ", ".join(f"{k} {v}" for k, v in screening.counts.items() if v and k != KEPT) or "none"
        raise RELEDError(f"no street transitions to learn from in {rollouts_dir}: {screening.read} rows read, "
                         f"{screening.kept} kept, dropped: {dropped}; check --devices and --version")
    before = copy.deepcopy(run.learner.actor)
    mix = StreetMix(street, street_share, rho_max, np.random.default_rng([run.config.seed, run.progress.updates]))
    rows = run.extra_updates(updates, mix, on_update)
    if holdout is None:
        unused = np.ones(len(street), dtype=bool)  # each sequence's last row only bootstraps: never empty
        unused[street.transitions[mix.used]] = False
        holdout, source = (street.obs[unused], street.masks[unused]), "street rows not used"
    else:
        source = "given"
    after = run.learner.actor
    rho, clipped = np.concatenate(mix.rho), np.concatenate(mix.clipped)
    return UpdateReport(
        run=folder, counts=screening.counts, unreadable=screening.unreadable, sequences=street.sequences,
        transitions=len(street.transitions), street_rows=[r["street_rows"] for r in rows],
        street_share=[r["street_share"] for r in rows], rho_mean=_mean(rho), rho_clipped_fraction=_mean(clipped),
        param_distance=float(torch.linalg.vector_norm(_parameters(after) - _parameters(before))),
        param_norm=float(torch.linalg.vector_norm(_parameters(before))),
        disagreement=_disagreement(before, after, *holdout), holdout=len(holdout[0]), holdout_source=source,
        eval_delay=rows[-1]["eval_delay"], updates=run.progress.updates)


def _parameters(actor: Actor) -> torch.Tensor:
    """The actor's weights as one vector (the observation normalizer's statistics are buffers, not included)."""
    return torch.nn.utils.parameters_to_vector(actor.parameters()).detach().double()


@torch.no_grad()
def _disagreement(before: Actor, after: Actor, obs: np.ndarray, masks: np.ndarray) -> float:
    o, m = torch.from_numpy(np.asarray(obs, dtype=np.float32)), torch.from_numpy(np.asarray(masks, dtype=bool))
    return float((before(o, m).argmax(-1) != after(o, m).argmax(-1)).double().mean()) if len(o) else 0.0


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None
