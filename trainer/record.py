"""Detector recordings from a SUMO run, one file per light, for the controllers' replay sensor (`reled record`).

A recording is what one light's detectors saw at each decision of a simulated episode: the per-phase readings
(queued, approaching, longest wait) the environment observed, the very numbers a policy sees in training, so a
controller replaying it (``edge_runtime.device.adapters.ReplaySensor``) sees that light's traffic. It is made here,
in the trainer, because it needs SUMO; a controller only plays the file and never imports SUMO or the trainer.

The file format is the edge's (:mod:`edge_runtime.recordings`): ``LIGHT.npz`` with ``per_phase`` [T, phases, 3],
the light's ``green_phases``, ``t`` (simulation seconds of each row) and how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.features import per_phase_values
from edge_runtime.recordings import recording_name, write_recording
from trainer.env import EnvConfig


@dataclass(frozen=True)
class Recording:
    light: str
    path: Path
    decisions: int


def record(config: EnvConfig, controller_name: str, seed: int, lights: list[str], out: Path) -> list[Recording]:
    """Play one episode of ``config`` with the controller and write every light's (or ``lights``') readings."""
    from trainer.controllers import make_controller
    from trainer.evaluate import controller_env
    from trainer.rollout import play_episode
    from trainer.scenarios import get_scenario

    controller = make_controller(controller_name)
    scenario = get_scenario(config.scenario)
    with controller_env(scenario, controller, config) as env:
        everyone = [inter.tls_id for inter in env.intersections]
        unknown = [light for light in lights if light not in everyone]
        if unknown:
            raise RELEDError(f"{scenario.name} has no light {', '.join(map(repr, unknown))}; its lights: "
                             f"{', '.join(everyone)}")
        chosen = {inter.tls_id: (k, inter.green_states) for k, inter in enumerate(env.intersections)
                  if not lights or inter.tls_id in lights}
        names = [recording_name(light) for light in chosen]
        if len(set(names)) < len(names):
            raise RELEDError(f"two of {scenario.name}'s lights map to the same file name: record them one at a time")
        episode = play_episode(env, controller, seed)
        delta, begin = env.timing.delta, scenario.begin
    out.mkdir(parents=True, exist_ok=True)
    t = begin + delta * np.arange(len(episode.obs))
    written = []
    for light, (k, greens) in chosen.items():
        path = out / recording_name(light)
        write_recording(path, light, greens, per_phase_values(episode.obs[:, k], len(greens)), t=t,
                        scenario=scenario.name, demand=config.demand, controller=controller.name, seed=seed,
                        decision_seconds=delta)
        written.append(Recording(light, path, len(episode.obs)))
    return written
