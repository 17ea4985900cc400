"""Street rollouts → learner rows: what the collector wrote, screened, rebuilt into each controller's decision
sequences and corrected off-policy for PPO (V-trace; docs/training.md, "Street rollouts (closed loop)").

Every row read is counted by its outcome, ``kept`` or the first reason in ``REASONS`` it fails, so no row is
lost unseen: a controller of another light, model or schema must show up in the counts, not vanish.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_runtime.features import MAX_PHASES, action_mask, feature_size
from edge_runtime.protocol import DEVICE_ID
from edge_runtime.rollouts import BATCH_FILE, COLUMNS, EPOCH_DIR, SOURCE_FALLBACK, SOURCE_POLICY
from trainer.marl.ppo import PPOLearner
from trainer.marl.storage import RolloutBatch, vtrace

KEPT = "kept"
# why a row is dropped, in the order they are checked (a row counts under the first that applies)
REASONS = (
    "schema",  # its file has another feature size or mask width
    "malformed",  # its file lacks a column or has one of the wrong type; or an unknown source
    "duplicate",  # (device, epoch, decision) seen before
    "non_finite",  # NaN or infinity in the observation, time, reward or log-probability
    "unknown_device",  # a device the caller's device → light mapping does not name
    "foreign_light",  # a light the run does not control (another scenario)
    "phase_count",  # its mask is not the phases of the run's light
    "lineage",  # played by a model that is not one of this run's exports
    "not_applied",  # the heads never showed it: the plant ran its fallback for that decision (a late HIL answer)
    "fallback",  # fixed-time fallback row, when those are left out
    "invalid_action",  # an action outside the mask, or a log-probability above 0
)
GAP_FACTOR = 1.5  # a step longer than this many decision intervals cuts the sequence
LOG_PROB_SLACK = 1e-4  # float error allowed above log 1


@dataclass(frozen=True)
class RunLights:
    """The lights a run controls (its agents, in order) and each one's phase count."""

    agents: list[str]
    n_phases: list[int]


class RowCounts:
    """Rows by outcome (``counts``: KEPT and every reason of REASONS); ``kept + dropped == read``."""

    counts: dict[str, int]

    @property
    def read(self) -> int:
        return sum(self.counts.values())

    @property
    def kept(self) -> int:
        return self.counts[KEPT]

    @property
    def dropped(self) -> int:
        return self.read - self.kept


@dataclass
class Screening(RowCounts):
    """The kept rows and every row's outcome."""

    counts: dict[str, int]  # KEPT and every reason of REASONS
    rows: dict[str, np.ndarray]  # the kept rows' COLUMNS, plus device, epoch and agent (index in the run)
    unreadable: list[str]  # files none of whose rows could be read: "path: why"


def _read_files(root: Path) -> tuple[dict[str, np.ndarray], dict[str, int], list[str]]:
    """Every batch file under ``root`` as the collector writes them (``<device>/<epoch>/<seq>.npz``): the rows
    of this schema with device and epoch columns, the rows of files that cannot be used, and unreadable files.
    Unlike ``read_rollouts``, a file of another schema is counted, not only logged."""
    parts: list[dict[str, np.ndarray]] = []
    lost = {"schema": 0, "malformed": 0}
    unreadable: list[str] = []
    for path in sorted(root.glob("*/*/*.npz")):
        device, epoch, name = path.relative_to(root).parts
        if not (DEVICE_ID.match(device) and EPOCH_DIR.match(epoch) and BATCH_FILE.match(name)):
            unreadable.append(f"{path}: not a <device>/<16 hex digit epoch>/<seq>.npz path")
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                columns = {k: data[k] for k in COLUMNS if k in data.files}
            rows = len(columns["decision"])
        except Exception as exc:  # whatever a damaged or foreign file raises (zip, zlib, npy, a missing column)
            unreadable.append(f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if any(k in columns and columns[k].shape[1:] != (width,)
               for k, width in (("obs", feature_size()), ("mask", MAX_PHASES))):
            lost["schema"] += rows
        elif any(k not in columns or columns[k].dtype != np.dtype(dtype) or columns[k].shape != (rows, *shape)
                 for k, (dtype, shape) in COLUMNS.items()):
            lost["malformed"] += rows
        else:
            parts.append({**columns, "device": np.full(rows, device),
                          "epoch": np.full(rows, int(epoch, 16), dtype=np.uint64)})
    if not parts:
        empty = {k: np.zeros((0, *s), dtype=d) for k, (d, s) in COLUMNS.items()}
        return {**empty, "device": np.zeros(0, dtype=str), "epoch": np.zeros(0, dtype=np.uint64)}, lost, unreadable
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, lost, unreadable


def screen(root: Path, lights: RunLights, devices: Mapping[str, str], versions: Collection[int],
           keep_fallback: bool = True, not_applied: Mapping[str, Sequence[tuple[float, float]]] | None = None
           ) -> Screening:
    """Read and screen the rollouts under ``root`` for a run controlling ``lights``.

    ``devices`` maps device id → light id (the device files' ``intersection``); ``versions`` are the
    policy_versions of this run's exports. Fallback rows (``source`` 1, version 0) come from the fixed-time
    plan whatever model a device holds, so they are kept (behaviour policy: the plan) unless ``keep_fallback``
    is False. ``not_applied``: per device, the signal-time spans [first, last] of decisions that were recorded
    but never reached the heads (a HIL run's fallbacks, from its report's events).
    """
    columns, lost, unreadable = _read_files(root)
    n = len(columns["decision"])
    outcome = np.full(n, KEPT, dtype=object)

    def drop(reason: str, rows: np.ndarray) -> None:
        outcome[rows & (outcome == KEPT)] = reason

    device, source, action = columns["device"], columns["source"], columns["action"].astype(np.int64)
    first = np.unique(np.rec.fromarrays([device, columns["epoch"], columns["decision"]]), return_index=True)[1]
    duplicate = np.ones(n, dtype=bool)
    duplicate[first] = False
    drop("duplicate", duplicate)
    drop("malformed", ~np.isin(source, (SOURCE_POLICY, SOURCE_FALLBACK)))
    finite = np.isfinite(columns["obs"]).all(axis=1)
    for name in ("time", "reward", "log_prob"):
        finite &= np.isfinite(columns[name])
    drop("non_finite", ~finite)
    names, inverse = np.unique(device, return_inverse=True)
    drop("unknown_device", ~np.isin(names, list(devices))[inverse])
    index = {a: k for k, a in enumerate(lights.agents)}
    agent = np.array([index.get(devices.get(str(d), ""), -1) for d in names], dtype=np.int64)[inverse]
    drop("foreign_light", agent < 0)
    expected = np.stack([action_mask(p) for p in lights.n_phases])[np.maximum(agent, 0)]
    drop("phase_count", ~(columns["mask"] == expected).all(axis=1))
    drop("lineage", (source == SOURCE_POLICY) & ~np.isin(columns["policy_version"], list(versions)))
    for name, spans in (not_applied or {}).items():
        for first_t, last_t in spans:
            drop("not_applied", (device == name) & (columns["time"] >= first_t) & (columns["time"] <= last_t))
    if not keep_fallback:
        drop("fallback", source == SOURCE_FALLBACK)
    allowed = (action >= 0) & (action < MAX_PHASES)
    allowed[allowed] = columns["mask"][np.flatnonzero(allowed), action[allowed]]
    drop("invalid_action", ~allowed | ((source == SOURCE_POLICY) & (columns["log_prob"] > LOG_PROB_SLACK)))
    kept = outcome == KEPT
    counts = {KEPT: int(kept.sum()), **dict.fromkeys(REASONS, 0), **lost}
    for reason in REASONS:
        counts[reason] += int((outcome == reason).sum())
    screening = Screening(counts, {**{k: v[kept] for k, v in columns.items()}, "agent": agent[kept]}, unreadable)
    assert screening.read == n + sum(lost.values()), "every row read has exactly one outcome"
    return screening


@dataclass
class StreetRows:
    """Kept rows in decision order per device; row i is a transition when row i+1 continues its sequence."""

    obs: np.ndarray  # [M, F] float32
    masks: np.ndarray  # [M, P] bool
    actions: np.ndarray  # [M] int64
    behaviour_log_probs: np.ndarray  # [M] log μ(a|o): the device's recorded log-prob, 0 on fixed-time rows
    rewards: np.ndarray  # [M] the reward recorded with the row: of its state, i.e. the previous action's
    continues: np.ndarray  # [M] bool: row i+1 is the next decision of row i's sequence

    @classmethod
    def from_screening(cls, rows: dict[str, np.ndarray], delta: float) -> StreetRows:
        """Sort each device's rows by (epoch, decision) and cut its sequence at a gap in decision ids (a dropped
        or lost row) or in time (no reading, a restart): more than ``GAP_FACTOR`` × ``delta`` s, or none."""
        order = np.lexsort((rows["decision"], rows["epoch"], rows["device"]))
        r = {k: v[order] for k, v in rows.items()}
        step = np.diff(r["time"])
        continues = np.zeros(len(order), dtype=bool)
        continues[:-1] = ((r["device"][1:] == r["device"][:-1]) & (r["epoch"][1:] == r["epoch"][:-1])
                          & (np.diff(r["decision"]) == 1) & (step > 0) & (step <= GAP_FACTOR * delta))
        fallback = r["source"] == SOURCE_FALLBACK  # the plan is deterministic: μ(a|o) = 1
        return cls(obs=r["obs"].astype(np.float32), masks=r["mask"].astype(bool),
                   actions=r["action"].astype(np.int64),
                   behaviour_log_probs=np.where(fallback, 0.0, r["log_prob"]).astype(np.float32),
                   rewards=r["reward"].astype(np.float32), continues=continues)

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def transitions(self) -> np.ndarray:
        """Indices of the rows that are transitions (every row but each sequence's last, which bootstraps)."""
        return np.flatnonzero(self.continues)

    @property
    def sequences(self) -> int:
        return int(len(self) - self.continues.sum())


@dataclass
class StreetBatch:
    """The transitions as learner rows, with their truncated importance weights ρ."""

    rows: RolloutBatch
    rho: np.ndarray  # ρ_t = min(ρ̄, π(a|o)/μ(a|o))
    clipped: np.ndarray  # π/μ > ρ̄


@torch.no_grad()
def street_batch(learner: PPOLearner, street: StreetRows, rho_max: float) -> StreetBatch:
    """Every transition under the learner's current networks: values from the local-observation critic, V-trace
    advantages and value targets on the run's reward scale, old log-probs = the behaviour's (PPO's ratio then
    clips around what the device ran), and the policy term's weight ρ_t / (π/μ), so that at the current
    policy the surrogate's gradient is V-trace's ρ_t·∇log π·A_t."""
    assert not learner.centralized, "street rows have no global state for MAPPO's critic"
    obs, masks = torch.from_numpy(street.obs), torch.from_numpy(street.masks)
    actions = torch.from_numpy(street.actions)
    values = learner.values(obs).double().numpy()
    log_pi = learner.actor.distribution(obs, masks).log_prob(actions).double().numpy()
    t = street.transitions
    log_ratio = log_pi[t] - street.behaviour_log_probs[t]
    rewards = street.rewards[t + 1] / learner.reward_scale()  # row t+1 records the queue after action t
    advantages, targets, rho = vtrace(rewards, values[t], values[t + 1], log_ratio, ~street.continues[t + 1],
                                      learner.ppo.gamma, learner.ppo.gae_lambda, rho_max)
    is_weight = np.exp(np.minimum(0.0, np.log(rho_max) - log_ratio))  # ρ/(π/μ) = min(1, ρ̄/(π/μ))
    n = len(t)
    rows = RolloutBatch(obs=obs[t], masks=masks[t], actions=actions[t],
                        old_log_probs=torch.from_numpy(street.behaviour_log_probs[t]),
                        advantages=torch.from_numpy(advantages).float(), returns=torch.from_numpy(targets).float(),
                        critic_in=obs[t], from_expert=torch.zeros(n, dtype=torch.bool), weight=torch.zeros(n),
                        is_weight=torch.from_numpy(is_weight).float())
    return StreetBatch(rows, rho, log_ratio > np.log(rho_max))
