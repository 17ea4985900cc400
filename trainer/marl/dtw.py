"""DTW distance between an agent's trajectory and its expert's (HPO's d_k).

A trajectory is one row per decision: the per-phase features (queue, approaching, longest wait of
every padded phase, normalized by the actor's running statistics so no feature's unit dominates)
followed by the one-hot of the chosen phase. The distance is dtaidistance's multivariate DTW (its
C backend: the square root of the least summed squared Euclidean cost over warping paths), divided
by √max(n, m), so that it is a root-mean-square cost per step and episodes of any length compare.
"""

from __future__ import annotations

import math

import numpy as np
from dtaidistance import dtw_ndim

from edge_runtime.features import MAX_PHASES, PER_PHASE_FEATURES

PHASE_FEATURES = len(PER_PHASE_FEATURES) * MAX_PHASES  # the per-phase block leads the observation


def trajectory(normalized_obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """[T, F] normalized observations and [T] actions → [T, 3·P + P] float64 rows for DTW."""
    one_hot = np.zeros((len(actions), MAX_PHASES))
    valid = actions >= 0  # NO_ACTION rows (nothing proposed) get an all-zero action block
    one_hot[np.flatnonzero(valid), actions[valid]] = 1.0
    return np.ascontiguousarray(np.concatenate([normalized_obs[:, :PHASE_FEATURES], one_hot], axis=1),
                                dtype=np.float64)


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Length-normalized multivariate DTW distance between two [T, D] trajectories (C backend)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("DTW needs two non-empty trajectories")
    return float(dtw_ndim.distance(a, b, use_c=True)) / math.sqrt(max(len(a), len(b)))
