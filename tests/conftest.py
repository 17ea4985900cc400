"""Test-wide setup and fixtures.

RELED's user data goes to a temp folder and Ray's token to the environment, never to the developer's home.
The CLI fixtures run `reled` as users do (a subprocess) and check the one-line errors every bad input must
get. ``wait_until`` is how a test waits for something that happens in another process (never sample once
and hope), and ``spawn`` starts processes that are killed with all their children when the test ends,
passed or failed.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import pytest

if TYPE_CHECKING:
    from edge_runtime.fleet.local import LocalFleet
    from edge_runtime.fleet.server import Model, ServerLink

_HOME = Path(tempfile.mkdtemp(prefix="reled-test-home-"))
os.environ["RELED_HOME"] = str(_HOME)
# Ray's token authentication from the environment, so that no test writes ~/.ray/auth_token; no usage reports
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"})

RELED_COMMAND = [sys.executable, "-m", "trainer"]


@pytest.fixture(scope="session")
def reled_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def reled_command() -> list[str]:
    """The `reled` command line (the module entry point of this interpreter, so the venv is used)."""
    return list(RELED_COMMAND)


@pytest.fixture(scope="session")
def reled() -> Callable[..., subprocess.CompletedProcess]:
    """Run `reled ARGS...` to completion and return the finished process (text output captured)."""
    def run(*args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*RELED_COMMAND, *args], capture_output=True, text=True, timeout=600, **kw)
    return run


@pytest.fixture(scope="session")
def assert_one_line_error() -> Callable[..., None]:
    """Check a refused command: exit code 2 and exactly one `error:` line holding every needle."""
    def check(proc: subprocess.CompletedProcess, *needles: str) -> None:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        for needle in needles:
            assert needle in lines[0], lines[0]
    return check


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., Any]:
    """``wait_until(condition, timeout, what)``: poll until ``condition()`` is truthy and return its value;
    fail naming ``what`` after ``timeout`` seconds."""
    def wait(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)
    return wait


@pytest.fixture(scope="session")
def kill_while_playing() -> Callable[..., threading.Thread]:
    """``kill_while_playing(worker, victim_pid, after)``: a thread that SIGKILLs ``victim_pid()`` ``after`` seconds
    into ``worker``'s next episode (a rollout worker whose ``job`` is set while it plays)."""
    def start(worker: Any, victim_pid: Callable[[], int], after: float) -> threading.Thread:
        def kill() -> None:
            while worker.job is None:
                time.sleep(0.005)
            time.sleep(after)
            os.kill(victim_pid(), signal.SIGKILL)

        thread = threading.Thread(target=kill)
        thread.start()
        return thread
    return start


class SignalRecorder:
    """What SUMO shows: every light's state in every simulated second of an episode, and the safety rules
    checked on it (each green between min and max green, then yellow, then all-red, unless the change stops
    no movement)."""

    @staticmethod
    def record(env: Any) -> dict[str, list[str]]:
        """Start recording ``env`` (its SUMO steps); the returned lists fill as the episode runs."""
        shown: dict[str, list[str]] = {inter.tls_id: [] for inter in env.intersections}
        step_to = env.sim.step_to

        def recording_step_to(time: float) -> None:
            seconds = round(time - env.api.simulation.getTime())
            for tls, states in shown.items():
                states.extend([env.api.trafficlight.getRedYellowGreenState(tls)] * seconds)
            step_to(time)

        env.sim.step_to = recording_step_to
        return shown

    @staticmethod
    def violations(shown: list[str], greens: tuple[str, ...], timing: Any) -> tuple[list[str], int]:
        """(every broken rule, number of greens shown); the first and last runs may be cut by the episode."""
        runs: list[list] = []  # [kind, state, seconds]
        for state in shown:
            kind = "green" if state in greens else ("yellow" if "y" in state else "red")
            if runs and runs[-1][1] == state:
                runs[-1][2] += 1
            else:
                runs.append([kind, state, 1])
        kinds = [r[0] for r in runs]
        problems = []
        for i, (kind, state, secs) in enumerate(runs[1:-1], start=1):
            if kind == "green" and kinds[i - 1] == "green":
                # a change that stops no movement (the new phase only adds greens) needs no yellow
                before = runs[i - 1][1]
                if not all(b in "Gg" for a, b in zip(before, state, strict=True) if a in "Gg"):
                    problems.append(f"green {before} -> green {state} without yellow")
            elif kind == "green":
                if not timing.min_green <= secs <= timing.max_green:
                    problems.append(f"green {state} shown {secs} s")
                if kinds[i - 1] != "red" or kinds[i - 2] != "yellow":
                    problems.append(f"green {state} not after yellow and all-red")
            elif kind == "yellow" and secs != timing.yellow:
                problems.append(f"yellow {state} shown {secs} s")
            elif kind == "red" and secs != timing.all_red:
                problems.append(f"all-red {state} shown {secs} s")
        return problems, kinds.count("green")


@pytest.fixture(scope="session")
def signals() -> SignalRecorder:
    return SignalRecorder()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """``spawn(cmd, **popen_kwargs)``: a Popen whose whole process tree is killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(cmd: list[str], **kw: Any) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, **kw)
        started.append(proc)
        return proc
    yield start
    for proc in started:
        try:
            tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=10)
        if proc.poll() is None:
            proc.wait(timeout=10)


# --- edge fleet fixtures ---
# Real Mosquitto brokers on free 127.0.0.1 ports and real daemon processes; every fixture stops what it
# started at teardown, also when the test fails. Edge modules are imported inside the fixtures so the
# trainer's tests do not load them.

FLEET_LIGHTS = {"dev0": 0, "dev1": 1, "dev2": 2, "dev3": 3}  # device -> index of its light in the policy
FLEET_FAST = {"runtime": {"decision_seconds": 1.0, "speed": 20.0},
              "probation": {"decisions": 10},
              "download": {"kbps": 8.0, "chunk_timeout": 1.0},
              "security": {"max_model_bytes": 1_000_000},
              # the daemons, the broker and pytest share this machine's 2 cores: a scheduling stall of a few ms is
              # not the policy's fault (a street controller has its CPU to itself and keeps the 5 ms default)
              "inference": {"latency_budget_ms": 50.0}}
FLEET_ROLLOUTS = {"runtime": {"decision_seconds": 1.0, "speed": 500.0, "max_decisions": 10_000},
                  "rollouts": {"batch_rows": 250, "flush_seconds": 0.5, "resend_seconds": 3.0}}


@dataclass
class FleetUnderTest:
    """A started local fleet with the policies the tests deploy and a server connection that watches it."""

    local: LocalFleet
    models: dict[int, Model]  # policy version -> exported grid2x2 model
    lights: list[str]  # the policy's lights, sorted; device devK runs lights[K]
    link: ServerLink

    def pump(self) -> None:
        self.link.pump(0.05)

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait for ``predicate()`` while taking in what the devices publish."""
        from edge_runtime.fleet.local import wait_for

        return wait_for(predicate, timeout, what, poll=self.pump)

    def reported(self, device: str) -> dict[str, Any]:
        return self.link.reported.get(device, {})

    def active_sha(self, device: str) -> str | None:
        return (self.reported(device).get("active") or {}).get("sha256")

    def wait_event(self, device: str, needle: str, timeout: float = 30.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.link.events.get(device, []) if needle in e["detail"]), None)

        return self.wait(found, timeout, f"an event on {device} saying {needle!r}")

    def deploy(self, version: int, *devices: str, timeout: float = 120) -> None:
        """Deploy policy ``version`` to ``devices`` through the CLI and wait until they all report it active."""
        args = [a for d in devices for a in ("--device", d)]
        proc = self.local.edge("deploy", *args, "--model", str(self.models[version].path), "--timeout",
                               str(timeout), timeout=timeout + 60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sha = self.models[version].sha256
        self.wait(lambda: all(self.active_sha(d) == sha for d in devices), 30, f"v{version} active on {devices}")


@pytest.fixture
def local_fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    """An empty local fleet in this test's folder (the broker gets a free 127.0.0.1 port); stopped at teardown."""
    from edge_runtime.fleet.local import LocalFleet

    fleet = LocalFleet(tmp_path / "fleet")
    try:
        yield fleet
    finally:
        fleet.close()


def export_policy(out: Path, version: int, seed: int) -> Model:
    """`reled export` of a fresh grid2x2 actor, as a user runs it."""
    from edge_runtime.fleet.server import Model

    proc = subprocess.run([*RELED_COMMAND, "export", "--scenario", "grid2x2", "--out", str(out), "--policy-version",
                           str(version), "--seed", str(seed), "--holdout-decisions", "20"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return Model.load(out)


@pytest.fixture(scope="session")
def fleet_models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Model]:
    """Policies v1, v2 and v3 of grid2x2 (different seeds, so different files), exported once per session, or
    taken from $RELED_TEST_MODELS (vN.onnx there: tools/platforms/py310.py exports them with the trainer's Python
    and runs these tests on the controller's)."""
    from edge_runtime.fleet.server import Model

    given = os.environ.get("RELED_TEST_MODELS")
    if given:
        return {v: Model.load(Path(given) / f"v{v}.onnx") for v in (1, 2, 3)}
    root = tmp_path_factory.mktemp("fleet-models")
    return {v: export_policy(root / f"v{v}.onnx", v, seed=v) for v in (1, 2, 3)}


@pytest.fixture
def edge_fleet(local_fleet: LocalFleet, fleet_models: dict[int, Model]) -> Callable[..., FleetUnderTest]:
    """``edge_fleet("dev0", ...)``: device files for dev0..dev3 (dev0-2 in group `test` with fast settings, dev3 in
    group `rollouts`), keys, a broker, and daemons for the named devices, each waited for until it reports."""

    def start(*running: str) -> FleetUnderTest:
        tables = fleet_models[1].phase_tables
        lights = sorted(tables)
        for device, k in FLEET_LIGHTS.items():
            rollouts = device == "dev3"
            local_fleet.write_device(device, lights[k], tables[lights[k]], replay_seed=k,
                                     groups=("rollouts",) if rollouts else ("test",),
                                     **(FLEET_ROLLOUTS if rollouts else FLEET_FAST))
        local_fleet.init_keys()
        local_fleet.start_broker()
        fleet = FleetUnderTest(local_fleet, fleet_models, lights, local_fleet.observer())
        for device in running:
            local_fleet.start_daemon(device)
        fleet.wait(lambda: all(d in fleet.link.reported for d in running), 60, f"{running} reporting")
        return fleet

    return start


def write_queue_policy(path: Path, *, version: int, tables: dict[str, list[str]], scenario: str,
                       test_queue: np.ndarray, n_phases: int, offset: float | None = None,
                       selftest_shift: float = 0.0) -> Path:
    """A small RELED policy file whose logits depend on the per-phase queues only: ``version × queue``, or
    ``log(queue − offset)`` when ``offset`` is given (NaN below it: a model that passes its self-test on
    ``test_queue`` and fails on a real approach). ``selftest_shift`` spoils the recorded self-test answers."""
    import onnx
    from onnx import TensorProto, helper

    from edge_runtime.features import MAX_PHASES, QUEUE_AT, SCHEMA_VERSION, feature_size
    from edge_runtime.policy import PolicyMetadata, SelfTest

    inputs = [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", feature_size()]),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", MAX_PHASES])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", MAX_PHASES]),
               helper.make_tensor_value_info("action", TensorProto.INT64, ["batch"])]
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v])
              for n, v in (("s", QUEUE_AT), ("e", QUEUE_AT + MAX_PHASES), ("a", 1))]
    consts.append(helper.make_tensor("masked", TensorProto.FLOAT, [], [-1e9]))
    nodes = [helper.make_node("Slice", ["obs", "s", "e", "a"], ["queue"])]
    if offset is None:
        consts.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [float(version)]))
        nodes.append(helper.make_node("Mul", ["queue", "scale"], ["raw"]))
    else:
        consts.append(helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]))
        nodes += [helper.make_node("Sub", ["queue", "offset"], ["shifted"]),
                  helper.make_node("Log", ["shifted"], ["raw"])]
    nodes += [helper.make_node("Where", ["mask", "raw", "masked"], ["logits"]),
              helper.make_node("ArgMax", ["logits"], ["action"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "queue_policy", inputs, outputs, initializer=consts)
    # IR 8, as `reled export` writes: ONNX Runtime 1.23 (the newest for Python 3.10) loads IR 11 at most
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    rows = test_queue.shape[0]
    test_obs = np.zeros((rows, feature_size()), dtype=np.float32)
    test_obs[:, QUEUE_AT:QUEUE_AT + MAX_PHASES] = test_queue
    test_mask = np.zeros((rows, MAX_PHASES), dtype=bool)
    test_mask[:, :n_phases] = True
    raw = version * test_queue if offset is None else np.log(test_queue - offset)
    expected = np.where(test_mask, raw, -1e9).astype(np.float32)
    expected[:, 0] += selftest_shift
    meta = PolicyMetadata(SCHEMA_VERSION, feature_size(), MAX_PHASES, version, "fp32", scenario, tables,
                          SelfTest(test_obs.tolist(), test_mask.tolist(), expected.tolist(),
                                   expected.argmax(1).tolist(), 1e-3))
    helper.set_model_props(model, meta.to_props())
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def queue_policy() -> Callable[..., Path]:
    """:func:`write_queue_policy`: small hand-built policies for the deploy tests (no training needed)."""
    return write_queue_policy


# what the fuzz tests build hostile messages from: the protocol's field names, markup, control characters, long text
FUZZ_NAMES = ["device", "state", "active", "job", "sha256", "policy_version", "decisions", "error", "online", "kind",
              "detail", "chunks", "epoch", "seq", "rows", "columns", "format", "manifest", "size", "chunk_size",
              "issued", "expires", "doc", "sig", "phase_table", "intersection"]
FUZZ_STRINGS = ["", "dev2", "[/bold]", "[link=file:///etc/passwd]x[/link]", "\x1b[2J", "a" * 5000, "COMMITTED",
                "é" * 10]


def random_value(rng: random.Random, depth: int, wide: bool) -> Any:
    """JSON-able (``wide``: also integers beyond 64 bits) values of random depth and size."""
    pick = rng.randrange(9 if depth > 0 else 6)
    if pick == 0:
        big = [10 ** rng.randrange(400), -(10**19)] if wide else []
        return rng.choice([0, -1, 1, 2**63 - 1, 2**63, -(2**63), *big])
    if pick == 1:
        return rng.choice([0.5, -0.0, 1e308, -1e-300, 3.0])
    if pick == 2:
        return rng.choice(FUZZ_STRINGS)
    if pick in (3, 4):
        return rng.choice([True, False, None])
    if pick == 5:
        return "0123456789abcdef"[rng.randrange(16)] * 64
    if pick in (6, 7):
        return {rng.choice(FUZZ_NAMES): random_value(rng, depth - 1, wide) for _ in range(rng.randrange(6))}
    return [random_value(rng, depth - 1, wide) for _ in range(rng.randrange(6))]
