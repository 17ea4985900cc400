"""Versioned observation schema shared by the SUMO environment and the street controller.

One vector layout serves every intersection: per green phase (padded to ``MAX_PHASES``)
the queued vehicles, the moving vehicles approaching within the detector range and the
longest wait; then the current green as one-hot, the seconds it has been green and a flag
telling whether min green is met. Values are raw (vehicles, seconds): normalisation belongs
to the policy, so a controller fills this vector straight from its own detectors.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 1
MAX_PHASES = 8
PER_PHASE_FEATURES = ("queue", "approaching", "max_wait")
DETECTOR_RANGE_M = 200.0


# Where each block starts in the vector (for MAX_PHASES); the environment fills it in bulk.
QUEUE_AT = 0
APPROACHING_AT = MAX_PHASES
MAX_WAIT_AT = 2 * MAX_PHASES
CURRENT_PHASE_AT = 3 * MAX_PHASES
TIME_IN_PHASE_AT = 4 * MAX_PHASES
MIN_GREEN_MET_AT = 4 * MAX_PHASES + 1
PER_PHASE_AT = (QUEUE_AT, APPROACHING_AT, MAX_WAIT_AT)  # in PER_PHASE_FEATURES order


def per_phase_values(vectors: np.ndarray, n_phases: int) -> np.ndarray:
    """The (queue, approaching, max_wait) of the first ``n_phases`` phases: [..., F] → [..., n_phases, 3]."""
    return np.stack([vectors[..., at:at + n_phases] for at in PER_PHASE_AT], axis=-1)


def feature_names(max_phases: int = MAX_PHASES) -> list[str]:
    """Names of the vector's entries, in order (stored in exported models for auditing)."""
    names = [f"{feat}[{p}]" for feat in PER_PHASE_FEATURES for p in range(max_phases)]
    names += [f"current_phase[{p}]" for p in range(max_phases)]
    return [*names, "time_in_phase", "min_green_met"]


def feature_size(max_phases: int = MAX_PHASES) -> int:
    return (len(PER_PHASE_FEATURES) + 1) * max_phases + 2


def action_mask(n_phases: int, max_phases: int = MAX_PHASES) -> np.ndarray:
    """Boolean mask of the phases a light really has (the rest is padding)."""
    if not 1 <= n_phases <= max_phases:
        raise ValueError(f"a light needs 1..{max_phases} green phases, got {n_phases}")
    mask = np.zeros(max_phases, dtype=bool)
    mask[:n_phases] = True
    return mask


def build_observation(per_phase: np.ndarray, current_phase: int, time_in_phase: float,
                      min_green_met: bool, max_phases: int = MAX_PHASES,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Fill the schema vector from an ``[n_phases, 3]`` array of (queue, approaching, max_wait)."""
    n_phases = per_phase.shape[0]
    if per_phase.shape != (n_phases, len(PER_PHASE_FEATURES)) or n_phases > max_phases:
        raise ValueError(f"per_phase must be [n<= {max_phases}, {len(PER_PHASE_FEATURES)}], "
                         f"got {per_phase.shape}")
    obs = np.zeros(feature_size(max_phases), dtype=np.float32) if out is None else out
    obs.fill(0.0)
    for k in range(len(PER_PHASE_FEATURES)):
        obs[k * max_phases:k * max_phases + n_phases] = per_phase[:, k]  # max_phases may differ from MAX_PHASES
    base = len(PER_PHASE_FEATURES) * max_phases
    obs[base + current_phase] = 1.0
    obs[base + max_phases] = time_in_phase
    obs[base + max_phases + 1] = 1.0 if min_green_met else 0.0
    return obs
