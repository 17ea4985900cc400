"""The environment on real SUMO: PettingZoo API, observation schema, safety of what SUMO shows."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, build_observation, feature_size
from trainer.env import TrafficSignalEnv
from trainer.scenarios import DecisionTiming


@pytest.mark.parametrize(("scenario", "seconds", "cycles"), [
    ("grid2x2", 600, 200),
    pytest.param("cologne8", 1200, 400, marks=pytest.mark.slow),
])
def test_pettingzoo_parallel_api(scenario, seconds, cycles):
    env = TrafficSignalEnv(scenario=scenario, episode_seconds=seconds)
    try:
        parallel_api_test(env, num_cycles=cycles)
    finally:
        env.close()


def test_heterogeneous_lights_share_one_space():
    env = TrafficSignalEnv(scenario="cologne8", episode_seconds=60)
    try:
        phases = {i.n_phases for i in env.intersections}
        assert len(phases) > 1, "cologne8 mixes 2-, 3- and 4-phase lights"
        obs, _infos = env.reset(seed=0)
        for inter in env.intersections:
            ob = obs[inter.tls_id]
            assert ob["observation"].shape == (feature_size(),)
            assert ob["action_mask"].sum() == inter.n_phases
            assert env.action_space(inter.tls_id).n == MAX_PHASES
    finally:
        env.close()


def test_observation_matches_the_edge_schema():
    """The bulk-filled vectors equal what the controller's own builder makes from the same readings."""
    env = TrafficSignalEnv(scenario="grid3x3", episode_seconds=400)
    try:
        env.reset(seed=3)
        rng = np.random.default_rng(0)
        for _ in range(30):
            obs, *_ = env.step({a: int(rng.integers(0, 4)) for a in env.agents})
        assert any(ob["observation"][:MAX_PHASES].sum() > 0 for ob in obs.values()), "no queue after 300 s"
        for k, inter in enumerate(env.intersections):
            idx, lanes = env.readings.agent_in_lanes[k], env.readings.lanes
            served = inter.phase_lanes
            per_phase = np.stack([served @ lanes.queue[idx], served @ lanes.approaching[idx],
                                  (served * lanes.max_wait[idx]).max(axis=1)], axis=1)
            shield = env.shields[k]
            expected = build_observation(per_phase.astype(np.float32), shield.state.green_phase,
                                         shield.green_elapsed(env.time), shield.min_green_met(env.time))
            np.testing.assert_allclose(obs[inter.tls_id]["observation"], expected)
    finally:
        env.close()


def test_sumo_shows_yellow_and_all_red_and_respects_green_limits(signals):
    """Records the state SUMO runs during every simulated second (1 s decisions, random proposals)."""
    timing = DecisionTiming(delta=1.0, yellow=3.0, all_red=2.0, min_green=8.0, max_green=30.0)
    env = TrafficSignalEnv(scenario="grid3x3", episode_seconds=400, timing=timing)
    rng = np.random.default_rng(1)
    try:
        env.reset(seed=1)
        tls = env.intersections[0]
        shown = signals.record(env)
        while env.agents:
            env.step({a: int(rng.integers(0, MAX_PHASES)) for a in env.agents})
    finally:
        env.close()
    problems, greens = signals.violations(shown[tls.tls_id], tls.green_states, timing)
    assert greens > 5, "random proposals should change phase often"
    assert not problems, problems


def test_invalid_actions_hold_the_phase_and_are_counted():
    env = TrafficSignalEnv(scenario="grid2x2", episode_seconds=100)
    try:
        env.reset(seed=0)
        for _ in range(5):  # 50 s: below max green, so nothing may change the phase
            env.step(dict.fromkeys(env.agents, MAX_PHASES - 1))
        assert env.invalid_actions == 5 * len(env.possible_agents)
        assert all(s.state.phase == 0 for s in env.shields)
    finally:
        env.close()


def test_same_seed_same_traffic():
    def run(seed: int) -> dict:
        env = TrafficSignalEnv(scenario="grid2x2", episode_seconds=600)
        try:
            env.reset(seed=seed)
            while env.agents:
                _, _, _, _, infos = env.step(dict.fromkeys(env.agents, 1))
            return next(iter(infos.values()))["episode"]
        finally:
            env.close()

    assert run(5) == run(5)


@pytest.mark.parametrize("reward", ["queue", "wait", "pressure"])
def test_rewards_are_finite_and_not_positive_for_queue_and_wait(reward):
    env = TrafficSignalEnv(scenario="grid2x2", episode_seconds=300, reward=reward)
    try:
        env.reset(seed=0)
        seen = []
        while env.agents:
            _, rewards, *_ = env.step(dict.fromkeys(env.agents, 0))
            seen += list(rewards.values())
        assert np.isfinite(seen).all() and min(seen) <= 0
        assert max(seen) <= 0
        assert min(seen) < 0, "holding one phase for 300 s must build queues"
    finally:
        env.close()


def test_bad_configuration_is_refused():
    with pytest.raises(RELEDError, match="unknown reward"):
        TrafficSignalEnv(scenario="grid2x2", reward="speed")
    with pytest.raises(RELEDError, match="unknown demand regime"):
        TrafficSignalEnv(scenario="grid2x2", demand="rush")
    with pytest.raises(RELEDError, match="unknown scenario"):
        TrafficSignalEnv(scenario="atlantis")


def test_detectors_reach_past_short_stub_lanes_but_stop_at_other_signals():
    """Ingolstadt splits roads 1 m before junctions: the 200 m detector must continue upstream."""
    env = TrafficSignalEnv(scenario="ingolstadt7", episode_seconds=10)
    try:
        env.reset(seed=0)
        reader = env.readings.lanes
        stub = reader.lanes.index("10425609#1_1")
        covered = [reader.segment_lanes[i] for i in np.flatnonzero(reader.owner == stub)]
        assert any(lane.startswith("10425609#0_") for lane in covered), covered
        signal_lanes = {ln for t in env.api.trafficlight.getIDList()
                        for ln in env.api.trafficlight.getControlledLanes(t)}
        for k, lane in enumerate(reader.lanes):
            upstream = [reader.segment_lanes[i] for i in np.flatnonzero(reader.owner == k)][1:]
            assert not set(upstream) & signal_lanes, f"{lane}'s detector crosses another signal"
    finally:
        env.close()
