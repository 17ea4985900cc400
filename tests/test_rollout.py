"""The one episode loop: what it records, how it marks expert rows, and the per-lane arrivals experts read."""

from __future__ import annotations

import numpy as np

from edge_runtime.features import MAX_PHASES, feature_size
from trainer.controllers import make_controller
from trainer.env import TrafficSignalEnv
from trainer.marl.config import load_train_config
from trainer.marl.ppo import PPOLearner
from trainer.rollout import NO_ACTION, play_episode


def test_one_loop_records_every_decision_and_marks_its_source():
    env = TrafficSignalEnv(scenario="grid2x2", episode_seconds=300, with_pressure=True)
    try:
        agent = play_episode(env, make_controller("max-pressure"), seed=1)
        steps, n = agent.actions.shape
        assert steps == 30 and n == len(env.possible_agents)
        assert agent.obs.shape == (steps, n, feature_size()) and agent.masks.shape == (steps, n, MAX_PHASES)
        assert agent.rewards.shape == (steps, n) and agent.last_obs.shape == (n, feature_size())
        assert (agent.actions >= 0).all() and agent.masks[np.arange(steps)[:, None], np.arange(n), agent.actions].all()
        assert not agent.from_expert.any()
        assert agent.metrics["vehicles"] > 0 and agent.sim_seconds > 0
        expert = play_episode(env, make_controller("max-pressure"), seed=1, source="expert")
        assert expert.from_expert.all()
        np.testing.assert_array_equal(expert.actions, agent.actions)  # same seed, same decisions
        first = play_episode(env, make_controller("greedy"), seed=1, max_decisions=4)
        assert first.actions.shape == (4, n) and first.metrics == {}  # stopped early: no trip metrics
    finally:
        env.close()


def test_fixed_time_rows_record_no_action():
    env = TrafficSignalEnv(scenario="grid2x2", episode_seconds=100, fixed_time=True)
    try:
        episode = play_episode(env, make_controller("fixed"), seed=0)
        assert (episode.actions == NO_ACTION).all()
    finally:
        env.close()


def test_ppo_sees_expert_rows_as_expert_rows():
    env = TrafficSignalEnv(scenario="grid2x2", episode_seconds=200)
    try:
        agent = play_episode(env, make_controller("greedy"), seed=0)
        expert = play_episode(env, make_controller("greedy"), seed=0, source="expert")
    finally:
        env.close()
    learner = PPOLearner(load_train_config(None, train={}), n_agents=agent.actions.shape[1])
    batch = learner.prepare([agent, expert])
    rows = agent.actions.size
    assert not batch.from_expert[:rows].any() and batch.from_expert[rows:].all()


def test_lane_arrivals_count_vehicles_new_on_each_incoming_lane():
    """Checked against the vehicles SUMO lists on each lane at consecutive decisions."""
    env = TrafficSignalEnv(scenario="grid2x2", episode_seconds=600, with_inflow=True)
    try:
        _obs, infos = env.reset(seed=2)
        seen = {lane: set(env.api.lane.getLastStepVehicleIDs(lane)) for i in env.intersections for lane in i.in_lanes}
        total = 0.0
        while env.agents:
            _obs, _r, _t, _tr, infos = env.step(dict.fromkeys(env.agents, 0))
            if not env.agents:
                break
            for inter in env.intersections:
                expected = []
                for lane in inter.in_lanes:
                    now = set(env.api.lane.getLastStepVehicleIDs(lane))
                    expected.append(len(now - seen[lane]))
                    seen[lane] = now
                np.testing.assert_array_equal(infos[inter.tls_id]["lane_arrivals"], expected)
                total += sum(expected)
        assert total > 50, "grid2x2 should send vehicles into the lights within 10 minutes"
    finally:
        env.close()
