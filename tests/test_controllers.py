"""Heuristic controllers: decisions on hand-made observations and on real SUMO runs."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.errors import RELEDError
from edge_runtime.features import action_mask, build_observation
from trainer.controllers import make_controller
from trainer.env import EnvConfig
from trainer.evaluate import evaluate, summarise
from trainer.scenarios import get_scenario


def ob(queues, approaching=None, n_phases=None):
    n = n_phases or len(queues)
    per_phase = np.stack([queues, approaching or [0] * n, [0] * n], axis=1).astype(np.float32)
    return {"observation": build_observation(per_phase, 0, 12.0, True),
            "action_mask": action_mask(n).astype(np.int8)}


def test_greedy_serves_the_longest_queue_and_breaks_ties_by_approaching():
    greedy = make_controller("greedy")
    assert greedy.act({"a": ob([1, 7, 3])}, {}) == {"a": 1}
    assert greedy.act({"a": ob([4, 4], approaching=[0, 5])}, {}) == {"a": 1}


def test_max_pressure_uses_phase_pressure_and_the_mask():
    mp = make_controller("max-pressure")
    infos = {"a": {"phase_pressure": np.array([2.0, -1.0, 9.0])}}
    assert mp.act({"a": ob([0, 0, 0])}, infos) == {"a": 2}


def test_random_only_picks_valid_phases():
    rnd = make_controller("random")
    rnd.reset(3)
    picks = {rnd.act({"a": ob([0, 0, 0])}, {})["a"] for _ in range(200)}
    assert picks == {0, 1, 2}


def test_unknown_controller():
    with pytest.raises(RELEDError, match="choose one of fixed, greedy, max-pressure, random"):
        make_controller("psychic")


def test_adaptive_controllers_beat_random_on_a_real_grid():
    scenario = get_scenario("grid3x3")
    results = evaluate(scenario, [make_controller(n) for n in ("greedy", "max-pressure", "random")], [0, 1],
                       EnvConfig(scenario="grid3x3", episode_seconds=900))
    delay = {k: v[0] for k, v in summarise(results, "avg_delay").items()}
    assert delay["greedy"] < delay["random"] and delay["max-pressure"] < delay["random"]
