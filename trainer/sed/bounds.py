"""The non-stationarity bound (docs/sed.md), as plain functions of measured arrays.

    |J_j(π) − J_j(π')| ≤ ε_j / (1 − γ) + 2 γ R_max / (1 − γ)² · D_j

ε_j is the volatility of what enters subset j from outside (inflow across its boundary lanes,
per decision step, as a fraction of the lanes' capacity); D_j is the mean total-variation
distance between the agents' policy and the expert on the demonstration states. Rewards are
normalised by the subset's detector capacity, so R_max = 1 and G_j is comparable across subsets.
"""

from __future__ import annotations

import numpy as np

SATURATION_FLOW_VEH_PER_S = 0.5  # 1800 veh/h per lane, the textbook saturation flow
VEHICLE_SPACE_M = 7.5  # 5 m car + 2.5 m gap: a detector of L metres holds L / 7.5 vehicles


def external_volatility(inflow: np.ndarray, boundary_lanes: int, decision_seconds: float) -> float:
    """ε_j: std over decision steps of the vehicles entering across boundary lanes per step, normalised
    by what those lanes can carry in one step. Constant inflow gives 0."""
    if boundary_lanes <= 0 or len(inflow) < 2:
        return 0.0
    capacity = boundary_lanes * SATURATION_FLOW_VEH_PER_S * decision_seconds
    return float(np.std(np.asarray(inflow, dtype=float) / capacity))


def policy_divergence(agent_probs: np.ndarray, expert_probs: np.ndarray) -> float:
    """D_j: mean over rows (agent k, state o) of TV(π_θ(·|o), π_E(·|o)) = ½ Σ_a |π_θ − π_E|."""
    agent_probs, expert_probs = np.asarray(agent_probs, float), np.asarray(expert_probs, float)
    if agent_probs.shape != expert_probs.shape:
        raise ValueError(f"policy shapes differ: {agent_probs.shape} vs {expert_probs.shape}")
    if agent_probs.size == 0:
        return 0.0
    return float(0.5 * np.abs(agent_probs - expert_probs).sum(axis=-1).mean())


def one_hot(actions: np.ndarray, n: int) -> np.ndarray:
    """The expert as a distribution: all mass on its chosen phase."""
    out = np.zeros((len(actions), n))
    out[np.arange(len(actions)), np.asarray(actions, dtype=int)] = 1.0
    return out


def nonstationarity_bound(epsilon: float, divergence: float, gamma: float, r_max: float = 1.0) -> float:
    """B_j, the right-hand side of the bound."""
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return epsilon / (1 - gamma) + 2 * gamma * r_max / (1 - gamma) ** 2 * divergence


def subset_score(ret: float, bound: float, lam: float) -> float:
    """What refinement maximises: return minus λ times the bound."""
    return ret - lam * bound
