"""100 episodes back to back must not leak SUMO processes, file handles or memory."""

from __future__ import annotations

import psutil
import pytest

from trainer.env import TrafficSignalEnv


def _sumo_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("sumo")]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["libsumo", "traci"])
def test_hundred_episodes_do_not_leak(backend):
    me = psutil.Process()
    env = TrafficSignalEnv(scenario="grid2x2", backend=backend, episode_seconds=120)
    rss, fds = [], []
    try:
        for episode in range(100):
            env.reset(seed=episode)
            while env.agents:
                env.step(dict.fromkeys(env.agents, episode % 2))
            assert env.last_metrics is not None and env.last_metrics.vehicles > 0
            if episode in (9, 99):  # after warm-up, and at the end
                rss.append(me.memory_info().rss)
                fds.append(me.num_fds())
            assert len(_sumo_children()) == 0
    finally:
        env.close()
    assert fds[1] <= fds[0], f"file handles grew from {fds[0]} to {fds[1]}"
    growth_mb = (rss[1] - rss[0]) / 2**20
    assert growth_mb < 40, f"memory grew {growth_mb:.1f} MB over 90 episodes"
    assert not _sumo_children()
