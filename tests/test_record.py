"""`reled record`: recordings from a real SUMO run are what the environment observed, and controllers replay them.

The recording is compared, reading by reading, with a second SUMO run of the same seed (the replay sensor's
observations against the environment's); a real daemon then replays one and its outbox holds exactly those
readings, in order; `reled-edge fleet up --replay --recordings` gives each controller its light's file.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import RELED_COMMAND

from edge_runtime.device.adapters import ReplaySensor
from edge_runtime.features import MAX_PHASES, QUEUE_AT, build_observation, feature_size
from edge_runtime.fleet.local import EDGE
from edge_runtime.recordings import read_recording, recording_name

pytestmark = pytest.mark.slow
SECONDS = 300  # 30 decisions of grid2x2: queues have formed by then
SEED = 3
PER_PHASE = 3 * MAX_PHASES  # the traffic part of the observation (queued, approaching, longest wait per phase)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recordings")
    proc = subprocess.run([*RELED_COMMAND, "record", "--scenario", "grid2x2", "--controller",
                           "max-pressure", "--seconds", str(SECONDS), "--seed", str(SEED), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_recording_replays_what_the_environment_observed(recorded):
    from trainer.controllers import make_controller
    from trainer.env import EnvConfig
    from trainer.evaluate import controller_env
    from trainer.rollout import play_episode
    from trainer.scenarios import get_scenario

    controller = make_controller("max-pressure")
    with controller_env(get_scenario("grid2x2"), controller, EnvConfig("grid2x2", episode_seconds=SECONDS)) as env:
        episode = play_episode(env, controller, SEED)
        intersections = env.intersections
    assert sorted(p.name for p in recorded.glob("*.npz")) == sorted(recording_name(i.tls_id) for i in intersections)
    assert episode.obs[:, :, QUEUE_AT:QUEUE_AT + MAX_PHASES].sum() > 0  # traffic, not an empty net
    for k, inter in enumerate(intersections):
        sensor = ReplaySensor(recorded / recording_name(inter.tls_id), inter.n_phases, inter.green_states)
        device = np.stack([build_observation(sensor.read(), 0, 0.0, False) for _ in range(len(episode.obs))])
        np.testing.assert_array_equal(device[:, :PER_PHASE], episode.obs[:, k, :PER_PHASE], err_msg=inter.tls_id)


def test_a_daemon_replays_a_recording_reading_by_reading(recorded, local_fleet, wait_until):
    path = recorded / recording_name("A1")
    recording = read_recording(path)
    rows = len(recording.per_phase)
    local_fleet.write_device("dev0", "A1", list(recording.green_phases), recording=path,
                             runtime={"decision_seconds": 1.0, "speed": 50.0, "max_decisions": rows})
    local_fleet.init_keys()  # no broker: the daemon drives and records without one
    daemon = local_fleet.start_daemon("dev0")
    outbox = local_fleet.root / "state" / "dev0" / "outbox.sqlite"

    def recorded_rows() -> list[bytes]:
        """The outbox's rows so far (none while the daemon has not created it and its tables yet)."""
        if not outbox.exists():
            return []
        try:
            with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as db:
                return [row[0] for row in db.execute("SELECT obs FROM rows ORDER BY id")]
        except sqlite3.OperationalError:  # created, its schema not yet written
            return []

    wait_until(lambda: len(recorded_rows()) >= rows or daemon.poll() is not None, 60, f"{rows} decisions recorded")
    assert daemon.poll() is None, (local_fleet.root / "dev0.daemon.log").read_text()
    obs = np.stack([np.frombuffer(blob, dtype=np.float32) for blob in recorded_rows()])
    assert obs.shape == (rows, feature_size())
    n = len(recording.green_phases)
    for at, feature in zip((0, MAX_PHASES, 2 * MAX_PHASES), range(3), strict=True):
        np.testing.assert_array_equal(obs[:, at:at + n], recording.per_phase[:, :, feature])


def test_fleet_up_replays_each_lights_recording(recorded, tmp_path, queue_policy, assert_one_line_error):
    tables = {light: list(read_recording(recorded / recording_name(light)).green_phases)
              for light in ("A0", "A1", "B0", "B1")}
    model = queue_policy(tmp_path / "m.onnx", version=1, tables=tables, scenario="grid2x2",
                         test_queue=np.tile(np.arange(1, 9, dtype=np.float32), (4, 1)), n_phases=2)
    fleet = tmp_path / "fleet"

    def edge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=300)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(edge("fleet", "up", "--model", str(model), "--dir", str(fleet), "--replay", "--recordings",
                               str(empty), "--devices", "2"), "no recording of light(s) A0, A1", "reled record")
    assert not fleet.exists()
    try:
        proc = edge("fleet", "up", "--model", str(model), "--dir", str(fleet), "--replay", "--recordings",
                    str(recorded), "--devices", "2", "--no-deploy", "--no-collect")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for device, light in (("dev0", "A0"), ("dev1", "A1")):
            assert (fleet / f"{device}.replay.npz").read_bytes() == (recorded / recording_name(light)).read_bytes()
    finally:
        edge("fleet", "down", "--dir", str(fleet))
