"""HPO's pieces on hand-computed cases: the weight formula, DTW, the imitation term's gradient, the modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, feature_size
from trainer.marl.config import HPOConfig, load_train_config
from trainer.marl.dtw import dtw_distance, trajectory
from trainer.marl.hpo import imitation_weight, sigmoid
from trainer.marl.ppo import PPOLearner
from trainer.marl.storage import RolloutBatch


def test_far_from_a_better_expert_the_weight_nears_w_max():
    # d = 5σ: 1 − e^−5 = 0.9933; expert 50% better than the agent with s = 0.1: sigmoid(5) = 0.9933
    w = imitation_weight(5.0, 1.0, -5.0, -10.0, w_max=2.0, gate_scale=0.1)
    assert w == pytest.approx(2.0 * (1 - math.exp(-5)) * (1 / (1 + math.exp(-5))), rel=1e-12)
    assert w > 0.98 * 2.0


def test_an_expert_worse_than_the_agent_gets_no_weight():
    # expert queues 10 vehicles, the agent 5: (−10 − −5) / (0.1·5) = −10 → sigmoid = 4.5e−5
    w = imitation_weight(5.0, 1.0, -10.0, -5.0, w_max=1.0, gate_scale=0.1)
    assert w == pytest.approx((1 - math.exp(-5)) / (1 + math.exp(10)), rel=1e-9)
    assert w < 1e-4


def test_close_to_the_expert_the_weight_fades_and_the_switches_remove_factors():
    assert imitation_weight(0.0, 1.0, -5.0, -10.0, w_max=1.0, gate_scale=0.1) == 0.0
    assert imitation_weight(0.1, 1.0, -5.0, -10.0, w_max=1.0, gate_scale=0.1) == pytest.approx(
        (1 - math.exp(-0.1)) * sigmoid(5.0))
    assert imitation_weight(0.0, 1.0, -5.0, -10.0, w_max=1.0, gate_scale=0.1, dtw=False) == pytest.approx(sigmoid(5.0))
    assert imitation_weight(5.0, 1.0, -10.0, -5.0, w_max=1.0, gate_scale=0.1, gate=False) == pytest.approx(
        1 - math.exp(-5))
    assert imitation_weight(5.0, 1.0, -10.0, -5.0, w_max=0.7, gate_scale=0.1, dtw=False, gate=False) == 0.7
    assert sigmoid(-1e6) == 0.0 and sigmoid(1e6) == 1.0  # no overflow


def _direct_dtw(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook DTW: least summed squared Euclidean cost over monotone warping paths, then the root."""
    n, m = len(a), len(b)
    cost = np.full((n + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            step = float(np.sum((a[i - 1] - b[j - 1]) ** 2))
            cost[i, j] = step + min(cost[i - 1, j], cost[i, j - 1], cost[i - 1, j - 1])
    return math.sqrt(cost[n, m])


def test_dtw_matches_a_direct_computation_and_is_length_normalized():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    assert dtw_distance(a, b) == pytest.approx(_direct_dtw(a, b) / math.sqrt(7), rel=1e-9)
    # a sequence and its time-stretched copy are at distance 0; a shifted one is not
    x = rng.normal(size=(6, 2))
    assert dtw_distance(x, np.repeat(x, 2, axis=0)) == pytest.approx(0.0, abs=1e-12)
    assert dtw_distance(x, x + 1.0) == pytest.approx(_direct_dtw(x, x + 1.0) / math.sqrt(6))


def test_trajectories_carry_the_phase_block_and_the_action_one_hot():
    obs = np.arange(2 * feature_size(), dtype=np.float32).reshape(2, -1)
    rows = trajectory(obs, np.array([2, -1]))
    assert rows.shape == (2, 4 * MAX_PHASES)
    np.testing.assert_array_equal(rows[:, :3 * MAX_PHASES], obs[:, :3 * MAX_PHASES])
    assert rows[0, 3 * MAX_PHASES + 2] == 1.0 and rows[0, 3 * MAX_PHASES:].sum() == 1.0
    assert rows[1, 3 * MAX_PHASES:].sum() == 0.0  # no action proposed: no one-hot


def _expert_batch(obs: torch.Tensor, mask: torch.Tensor, action: int, weight: float) -> RolloutBatch:
    n = obs.shape[0]
    zeros = torch.zeros(n)
    return RolloutBatch(obs=obs, masks=mask, actions=torch.full((n,), action), old_log_probs=zeros,
                        advantages=zeros, returns=zeros, critic_in=torch.zeros(n, feature_size()),
                        from_expert=torch.ones(n, dtype=torch.bool), weight=torch.full((n,), weight))


def test_the_imitation_gradient_moves_toward_the_expert_phase_and_never_toward_a_masked_one():
    learner = PPOLearner(load_train_config(None, train={"algo": "reled"}), n_agents=1)
    torch.manual_seed(1)
    obs = torch.randn(16, feature_size())
    mask = torch.zeros(16, MAX_PHASES, dtype=torch.bool)
    mask[:, :3] = True  # phases 3..7 do not exist at this light
    batch = _expert_batch(obs, mask, action=1, weight=1.0)
    captured = []  # the actor's raw logits inside the imitation term, before the mask

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    hook = learner.actor.body.register_forward_hook(keep)
    probs_before = learner.actor.distribution(obs, mask).probs.detach()
    captured.clear()
    learner.imitation_term(batch).backward()
    hook.remove()
    grad = captured[0].grad
    assert torch.all(grad[:, 1] < 0)  # gradient descent raises the expert's logit
    assert torch.all(grad[:, [0, 2]] > 0)
    assert torch.all(grad[:, 3:] == 0)  # masked phases: probability 0, gradient exactly 0
    optimizer = torch.optim.SGD(learner.actor.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        learner.imitation_term(batch).backward()
        optimizer.step()
    probs_after = learner.actor.distribution(obs, mask).probs.detach()
    assert torch.all(probs_after[:, 1] > probs_before[:, 1])
    assert torch.all(probs_after[:, 3:] == 0)
    # weight 0 (gate closed): no gradient at all
    learner.actor.zero_grad()
    learner.imitation_term(_expert_batch(obs, mask, 1, 0.0)).backward()
    assert all(torch.all(p.grad == 0) for p in learner.actor.parameters() if p.grad is not None)


def test_ppo_terms_ignore_expert_rows_and_ippo_has_no_imitation_term():
    ippo = PPOLearner(load_train_config(None, train={"algo": "ippo"}), n_agents=1)
    obs = torch.randn(8, feature_size())
    mask = torch.ones(8, MAX_PHASES, dtype=torch.bool)
    assert "imitation" not in ippo.loss_terms(_agent_rows(obs, mask))
    reled = PPOLearner(load_train_config(None, train={"algo": "reled"}), n_agents=1)
    agent_only = reled.loss_terms(_agent_rows(obs, mask))
    mixed = reled.loss_terms(RolloutBatch.concat([_agent_rows(obs, mask), _expert_batch(obs, mask, 0, 1.0)]))
    for name in ("policy", "value", "entropy"):
        assert torch.equal(agent_only[name], mixed[name]), name
    assert agent_only["imitation"].item() == 0.0 and mixed["imitation"].item() > 0


def _agent_rows(obs: torch.Tensor, mask: torch.Tensor) -> RolloutBatch:
    n = obs.shape[0]
    return RolloutBatch(obs=obs, masks=mask, actions=torch.zeros(n, dtype=torch.long),
                        old_log_probs=torch.full((n,), -math.log(MAX_PHASES)), advantages=torch.linspace(-1, 1, n),
                        returns=torch.ones(n), critic_in=obs.clone(), from_expert=torch.zeros(n, dtype=torch.bool),
                        weight=torch.zeros(n))


@pytest.mark.parametrize(("mode", "fixed"), [("adaptive", None), ("none", 0.0), ("fixed:0.25", 0.25)])
def test_expert_weight_modes(mode, fixed):
    assert HPOConfig(expert_weight=mode).fixed_weight() == fixed


@pytest.mark.parametrize("mode", ["fixed:", "fixed:-1", "fixed:abc", "dtw", ""])
def test_a_bad_expert_weight_is_refused_in_one_line(mode):
    with pytest.raises(RELEDError, match="--expert-weight"):
        HPOConfig(expert_weight=mode)


def test_reled_settings_without_algo_reled_are_refused():
    with pytest.raises(RELEDError, match="need --algo reled"):
        load_train_config(None, train={"algo": "ippo"}, hpo={"w_max": 2.0})
    cfg = load_train_config(None, train={"algo": "reled"}, hpo={"w_max": 2.0, "gate": False})
    assert cfg.as_dict()["reled"]["w_max"] == 2.0 and cfg.as_dict()["reled"]["gate"] is False
    assert "reled" not in load_train_config(None, train={"algo": "ippo"}).as_dict()
