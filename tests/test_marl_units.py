"""PPO building blocks without SUMO: GAE, masking, normalization, critics, config and checkpoints."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, feature_size
from trainer.marl import checkpoint as ckpt
from trainer.marl.config import PPOConfig, load_train_config
from trainer.marl.networks import Actor, RunningNorm, critic_inputs
from trainer.marl.policy import choose_actions
from trainer.marl.ppo import PPOLearner
from trainer.marl.storage import RolloutBatch, gae
from trainer.rollout import Episode


def test_gae_matches_a_hand_computed_case():
    # two steps, γ = 0.5, λ = 0.5; values 1, 2; bootstrap 4
    rewards = torch.tensor([1.0, 3.0])
    values = torch.tensor([1.0, 2.0])
    adv, ret = gae(rewards, values, torch.tensor(4.0), gamma=0.5, lam=0.5)
    delta1 = 3.0 + 0.5 * 4.0 - 2.0  # 3
    delta0 = 1.0 + 0.5 * 2.0 - 1.0  # 1
    assert adv.tolist() == pytest.approx([delta0 + 0.25 * delta1, delta1])  # [1.75, 3]
    assert ret.tolist() == pytest.approx([2.75, 5.0])


def test_gae_with_lambda_one_is_the_discounted_return_minus_value():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.2], [0.1]])
    adv, ret = gae(rewards, values, torch.tensor([0.0]), gamma=0.9, lam=1.0)
    assert ret[:, 0].tolist() == pytest.approx([1 + 0.81 * 2, 0.9 * 2, 2.0])
    assert adv[:, 0].tolist() == pytest.approx((ret - values)[:, 0].tolist())


def _mask(valid: int, batch: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, MAX_PHASES, dtype=torch.bool)
    mask[:, :valid] = True
    return mask


def test_an_invalid_phase_never_gets_probability():
    actor = Actor()
    # push the head hard towards phase 7, which is invalid for a 3-phase light
    with torch.no_grad():
        actor.body[-1].bias[:] = 0.0
        actor.body[-1].bias[7] = 50.0
    obs = torch.rand(64, feature_size()) * 10
    probs = actor.distribution(obs, _mask(3, 64)).probs
    assert torch.all(probs[:, 3:] == 0.0)
    assert torch.allclose(probs.sum(-1), torch.ones(64))
    generator = torch.Generator().manual_seed(0)
    samples = choose_actions(actor, obs.numpy(), _mask(3, 64).numpy(), False, generator)
    assert samples.max() < 3
    assert choose_actions(actor, obs.numpy(), _mask(3, 64).numpy(), True).max() < 3


def test_running_norm_equals_the_statistics_of_all_batches():
    norm = RunningNorm(3)
    rng = np.random.default_rng(0)
    batches = [rng.normal(5, 2, (n, 3)) for n in (10, 200, 37)]
    for b in batches:
        norm.update(torch.from_numpy(b))
    everything = np.concatenate(batches)
    assert norm.mean.numpy() == pytest.approx(everything.mean(0), rel=1e-6)
    assert norm.var.numpy() == pytest.approx(everything.var(0), rel=1e-4)


def test_mappo_critic_sees_every_agent_and_its_own_id():
    obs = torch.arange(2 * 3 * feature_size(), dtype=torch.float32).reshape(2, 3, feature_size())
    local = critic_inputs(obs, centralized=False)
    central = critic_inputs(obs, centralized=True)
    assert local.shape == (2, 3, feature_size())
    assert central.shape == (2, 3, 3 * feature_size() + 3)
    assert torch.equal(central[1, 2, : 3 * feature_size()], obs[1].reshape(-1))
    assert central[1, 2, -3:].tolist() == [0.0, 0.0, 1.0]


def _episode(steps: int = 20, agents: int = 2, seed: int = 0) -> Episode:
    rng = np.random.default_rng(seed)
    obs = rng.random((steps, agents, feature_size())).astype(np.float32)
    masks = np.zeros((steps, agents, MAX_PHASES), dtype=bool)
    masks[..., :2] = True
    return Episode(seed=seed, obs=obs, masks=masks,
                   actions=rng.integers(0, 2, (steps, agents)), rewards=-rng.random((steps, agents)).astype(np.float32),
                   last_obs=obs[-1])


def test_loss_is_made_of_named_terms_and_ppo_ignores_expert_rows():
    learner = PPOLearner(load_train_config(None, train={"algo": "mappo"}), n_agents=2)
    batch = learner.prepare([_episode()])
    terms = learner.loss_terms(batch)
    assert set(terms) == {"policy", "value", "entropy"}
    expert = batch.rows(torch.arange(10))
    expert.from_expert = torch.ones(10, dtype=torch.bool)
    expert.actions = (expert.actions + 1) % 2  # expert rows that disagree must not move PPO's terms
    mixed = learner.loss_terms(RolloutBatch.concat([batch, expert]))
    for name in terms:
        assert mixed[name].item() == pytest.approx(terms[name].item(), rel=1e-5)


def test_config_refuses_unknown_keys_wrong_types_and_algorithms(tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("[ppo]\nlearning_rate = 0.1\n")
    with pytest.raises(RELEDError, match=r"unknown key\(s\) \['learning_rate'\] in \[ppo\]"):
        load_train_config(bad_key, train={})
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('[ppo]\nepochs = "ten"\n')
    with pytest.raises(RELEDError, match=r"\[ppo\] epochs = 'ten' should be int"):
        load_train_config(bad_type, train={})
    bad_section = tmp_path / "c.toml"
    bad_section.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(RELEDError, match="unknown section"):
        load_train_config(bad_section, train={})
    with pytest.raises(RELEDError, match="unknown algorithm 'qmix': choose one of ippo, mappo"):
        load_train_config(None, train={"algo": "qmix"})
    good = tmp_path / "d.toml"
    good.write_text('[train]\nalgo = "mappo"\nsteps = 1000\n[ppo]\nlr = 1\n[timing]\nmin_green = 5\n')
    cfg = load_train_config(good, train={"steps": 2000})
    assert (cfg.algo, cfg.steps, cfg.ppo.lr, cfg.env.timing.min_green) == ("mappo", 2000, 1.0, 5)
    assert cfg.ppo.epochs == PPOConfig.epochs


def _payload() -> dict:
    learner = PPOLearner(load_train_config(None, train={}), n_agents=2)
    return {"algo": "ippo", "scenario": "grid2x2", "demand": "moderate", "agents": ["a", "b"], "n_phases": [2, 2],
            "config": learner.config.as_dict(), "learner": learner.state_dict(), "progress": {}}


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    ckpt.save_checkpoint(path, _payload())
    before = path.read_bytes()

    def full_disk(target, data):
        target.write_bytes(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_durably", full_disk)
    with pytest.raises(RELEDError, match="No space left on device; the previous checkpoint is intact"):
        ckpt.save_checkpoint(path, _payload())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["scenario"] == "grid2x2"


def test_checkpoints_from_another_schema_scenario_or_format_are_refused(tmp_path):
    path = tmp_path / "x.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(RELEDError, match="is not a RELED checkpoint"):
        ckpt.load_checkpoint(path)
    with pytest.raises(RELEDError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    torch.save({**_payload(), "format": ckpt.FORMAT, "schema_version": 0, "feature_size": 20, "max_phases": 4}, path)
    with pytest.raises(RELEDError, match=r"observation schema v0 .* retrain the policy"):
        ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(path, _payload())
    data = ckpt.load_checkpoint(path)
    with pytest.raises(RELEDError, match=r"trained on scenario grid2x2 .*, not on cologne8"):
        ckpt.check_scenario(data, path, "cologne8", ["a", "b"], [2, 2])
    ckpt.check_scenario(data, path, "grid2x2", ["a", "b"], [2, 2])
