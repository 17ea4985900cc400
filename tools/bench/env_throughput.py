#!/usr/bin/env python3
"""Throughput of RELED's SUMO environment against sumo-rl and plain SUMO, on every net we ship.

Why: training cost is dominated by environment steps, so the environment must stay close to
the simulator's own speed and beat sumo-rl, the usual peer. Targets, per net: sumo-rl time /
our time >= 1.2, and ours at most 15 % over the replay of our own signal changes in bare SUMO
(the same traffic: SUMO's work held equal, so what is left is ours).

Nets: by default every RESCO net, the generated 6×6 grid and every imported city found on this
machine (`reled scenario list`), so the cost per agent-decision can be read as the number of
lights grows (1 → 36); ``--plot`` draws it.

Clock: CPU seconds of the measuring process by default (``--clock cpu``; libsumo runs SUMO in
that process, single-threaded), because wall time on a shared 2-core machine mostly measures the
other jobs: the same episode's wall time varied 0.34–0.87 s under load while its CPU time stayed
within a few %. ``--clock wall`` gives wall time; both are recorded in the JSON.

Every measurement runs in a fresh worker process (this script with ``--worker``), because
libsumo runs one simulation per process and because a fresh process keeps systems from
sharing warm state. Repeats are interleaved (round-robin over systems) so that slow drifts of
the machine hit every system alike; the table shows medians.

Systems, all on libsumo, same net, route file (``moderate`` demand), seed and episode:

* ``ours``: ``TrafficSignalEnv(collect_metrics=False)``, so SUMO writes no tripinfo;
* ``sumo-rl``: ``sumo_rl.parallel_env`` with the same files, begin, length, decision interval,
  min green, yellow 3 s, time-to-teleport 300 s, ``reward_fn="queue"`` and, unless
  ``--sumo-rl-info``, without its per-step system/agent info (its leanest setting, so the
  comparison is conservative for us);
* ``plain``: the same SUMO command as ours, the net's own signal programs, one
  ``simulationStep(end)`` call: the floor;
* ``sumo-binary``: that command run by the ``sumo`` executable (process start included), for
  reference;
* ``replay``: the same SUMO command, replaying the exact signal states our environment set at
  the exact times, with no observation or reward: SUMO's own cost for *our* traffic, so that
  overhead caused by different traffic (our signals vs the net's programs) is told apart from
  overhead caused by Python;
* ``ours-fixed``: our environment with ``fixed_time=True`` (the net's programs run, observations
  and rewards are still computed every decision): our overhead on *plain SUMO's* traffic.

``replay`` and ``ours-fixed`` are checked to reproduce the traffic they stand for (same vehicles
still running at the end); the tables say so.

Deterministic policy, identical for ``ours`` and ``sumo-rl``: agent ``a`` at its ``k``-th
decision (k = 0, 1, ...) proposes green phase ``(k // hold) % n_a``, where ``n_a`` is the number
of green phases the environment gives that agent (our action mask, sumo-rl's action space).
Both envs get min green = the decision interval, yellow 3 s, max green 60 s. Ours runs with
all-red 0 s by default (``--all-red``), because sumo-rl has no all-red: the two then show
nearly the same signal sequence, hence nearly the same traffic (the table says when it is
exactly the same); RELED's default timing's 2 s all-red makes SUMO itself do more work.

Targets: the brief's two (ours vs plain SUMO <= 15 %, sumo-rl / ours >= 1.0), plus two
"same traffic" checks that hold SUMO's work equal (ours vs replay, ours-fixed vs plain), since
the policy's traffic differs from the net's programs and SUMO's cost follows the traffic.
``--strict`` fails on the brief's targets only.

Episode wall time runs from ``reset()`` to ``close()``, SUMO start-up included (identical
work in every system); environment construction is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run by path from anywhere, installed or not
    sys.path.insert(0, str(REPO))

RESCO_NETS = ("cologne1", "cologne3", "cologne8", "ingolstadt1", "ingolstadt7", "ingolstadt21", "grid4x4",
              "arterial4x4")
GENERATED_NETS = ("grid6x6",)
DEFAULT_DELTAS = (10.0,)
DEMAND = "moderate"
YELLOW_S = 3.0
MAX_GREEN_S = 60.0
TIME_TO_TELEPORT_S = 300.0
MAX_OVERHEAD_PCT = 15.0  # target: ours at most 15 % over the replay of our signals (same traffic)
MIN_SPEED_RATIO = 1.2  # target: sumo-rl time / our time
CLOCKS = ("cpu", "wall")
SYSTEMS = ("plain", "sumo-binary", "ours", "replay", "ours-fixed", "sumo-rl")  # table order
PER_DECISION = ("ours", "replay", "ours-fixed", "sumo-rl")  # runs that depend on the decision interval
ENVS = ("ours", "ours-fixed", "sumo-rl")  # runs with Python in the loop


# ---------------------------------------------------------------------------------------------
# worker side: one measured episode per process
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkSpec:
    """What one worker process measures; travels as JSON on the command line."""

    system: str
    net: str
    seed: int
    delta: float | None = None
    hold: int = 3
    episode_seconds: float | None = None
    record: str | None = None  # ours: write the signal states set to this file (for replay)
    replay: str | None = None  # replay: the file written by ours
    profile: str | None = None  # ours: run under cProfile and dump the stats here
    sumo_rl_info: bool = False
    all_red: float = 0.0


def set_sumo_home() -> None:
    """SUMO_HOME must name the full SUMO (with bin/sumo) before libsumo or sumo-rl is imported.

    Importing libsumo first sets SUMO_HOME to its data-only copy, after which the ``sumo``
    binary is no longer found; sumo-rl refuses to import without SUMO_HOME.
    """
    import sumo

    os.environ["SUMO_HOME"] = sumo.SUMO_HOME


def deterministic_actions(agents: Iterable[str], n_actions: dict[str, int], counters: dict[str, int],
                          hold: int) -> dict[str, int]:
    """Agent ``a``'s k-th decision is ``(k // hold) % n_a``: cycles every phase, same in both envs."""
    actions = {}
    for agent in agents:
        k = counters[agent]
        actions[agent] = (k // hold) % n_actions[agent]
        counters[agent] = k + 1
    return actions


class Probe:
    """Times SUMO's own calls (start, step, close), wall and CPU, by wrapping them on the TraCI-like module.

    A wrapper costs ~0.2 µs per call and there are at most a few thousand per episode, so the
    measured episode is not disturbed. Optionally logs every signal state set, for replay.
    """

    def __init__(self, api: Any, record: bool = False) -> None:
        self.api = api
        self.totals = {"start": 0.0, "step": 0.0, "close": 0.0}
        self.cpu_s = 0.0  # the three calls' CPU time (libsumo: SUMO runs in this process)
        self.step_calls = 0
        self.commands: list[list[str]] = []
        self.signals: list[tuple[float, str, str]] = []
        self.fingerprint: dict[str, Any] | None = None
        orig_start, orig_step, orig_close = api.start, api.simulationStep, api.close

        def start(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
            self.commands.append([str(c) for c in cmd])
            t, c = time.perf_counter(), time.process_time()
            try:
                return orig_start(cmd, *args, **kwargs)
            finally:
                self.totals["start"] += time.perf_counter() - t
                self.cpu_s += time.process_time() - c

        def step(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return orig_step(*args, **kwargs)
            finally:
                self.totals["step"] += time.perf_counter() - t
                self.cpu_s += time.process_time() - c
                self.step_calls += 1

        def close(*args: Any, **kwargs: Any) -> Any:
            if self.fingerprint is None:  # the episode's end, not a later no-op close
                self.fingerprint = traffic_fingerprint(api)
            t, c = time.perf_counter(), time.process_time()
            try:
                return orig_close(*args, **kwargs)
            finally:
                self.totals["close"] += time.perf_counter() - t
                self.cpu_s += time.process_time() - c

        api.start, api.simulationStep, api.close = start, step, close
        if record:
            orig_set = api.trafficlight.setRedYellowGreenState
            get_time = api.simulation.getTime

            def set_state(tls: str, state: str) -> Any:
                self.signals.append((get_time(), tls, state))
                return orig_set(tls, state)

            api.trafficlight.setRedYellowGreenState = set_state

    def reset(self) -> None:
        """Forget set-up calls (environment construction) so only the episode is counted."""
        self.totals = dict.fromkeys(self.totals, 0.0)
        self.cpu_s = 0.0
        self.step_calls = 0
        self.commands.clear()
        self.signals.clear()
        self.fingerprint = None

    @property
    def sumo_s(self) -> float:
        return sum(self.totals.values())


class EpisodeClock:
    """Wall and CPU seconds of this process from construction to ``stop()``."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def traffic_fingerprint(api: Any) -> dict[str, Any] | None:
    """End-of-episode traffic state: equal fingerprints mean replay reproduced our traffic."""
    try:
        ids = sorted(api.vehicle.getIDList())
        return {"time": api.simulation.getTime(), "running": len(ids),
                "min_expected": api.simulation.getMinExpectedNumber(),
                "ids_crc32": zlib.crc32("\n".join(ids).encode())}
    except Exception:  # no simulation loaded (a second close): nothing to compare
        return None


def _episode(scenario_name: str, episode_seconds: float | None) -> tuple[Any, float, float]:
    """The scenario and its [begin, end) for this run (``--episode-seconds`` shortens it)."""
    from trainer.scenarios import get_scenario

    scenario = get_scenario(scenario_name)
    begin = scenario.begin
    end = begin + (episode_seconds or scenario.end - scenario.begin)
    return scenario, begin, end


def plain_command(spec: WorkSpec) -> list[str]:
    """Exactly the command our environment starts with collect_metrics=False (no tripinfo)."""
    from trainer.sim.simulation import sumo_command

    scenario, _, end = _episode(spec.net, spec.episode_seconds)
    return sumo_command(scenario, DEMAND, spec.seed, None, end=end, time_to_teleport=TIME_TO_TELEPORT_S)


def work_ours(spec: WorkSpec) -> dict[str, Any]:
    """Our environment, driven by the policy (``ours``) or by the net's programs (``ours-fixed``)."""
    import cProfile
    from dataclasses import replace

    import libsumo
    import numpy as np

    from trainer.env import TrafficSignalEnv
    from trainer.sim import lanes

    assert spec.delta is not None
    probe = Probe(libsumo, record=spec.record is not None)
    read_time = [0.0]
    orig_read = lanes.LaneReader.read

    def timed_read(self: Any) -> None:
        t = time.perf_counter()
        orig_read(self)
        read_time[0] += time.perf_counter() - t

    lanes.LaneReader.read = timed_read  # type: ignore[method-assign]
    scenario, _, _ = _episode(spec.net, spec.episode_seconds)
    timing = replace(scenario.timing, delta=spec.delta, yellow=YELLOW_S, all_red=spec.all_red,
                     min_green=spec.delta, max_green=MAX_GREEN_S)
    env = TrafficSignalEnv(scenario=spec.net, demand=DEMAND, backend="libsumo", collect_metrics=False,
                           timing=timing, episode_seconds=spec.episode_seconds,
                           time_to_teleport=TIME_TO_TELEPORT_S, fixed_time=spec.system == "ours-fixed")
    probe.reset()
    read_time[0] = 0.0
    profiler = cProfile.Profile() if spec.profile else None
    steps = 0
    clock = EpisodeClock()
    if profiler:
        profiler.enable()
    obs, _ = env.reset(seed=spec.seed)
    n_actions = {a: int(np.count_nonzero(o["action_mask"])) for a, o in obs.items()}
    counters = dict.fromkeys(obs, 0)
    agents = len(obs)
    while env.agents:
        env.step(deterministic_actions(env.agents, n_actions, counters, spec.hold))
        steps += 1
    env.close()
    if profiler:
        profiler.disable()
    wall, cpu = clock.stop()
    if profiler and spec.profile:
        profiler.dump_stats(spec.profile)
    if spec.record:
        Path(spec.record).write_text(json.dumps(probe.signals))
    return _result(spec, probe, wall, cpu, agents, steps, n_actions, obs_read_s=read_time[0],
                   timing=asdict(timing))


def work_sumo_rl(spec: WorkSpec) -> dict[str, Any]:
    import warnings

    os.environ["LIBSUMO_AS_TRACI"] = "1"  # before sumo_rl (and traci) are imported
    import traci

    probe = Probe(traci)
    import sumo_rl

    assert spec.delta is not None
    scenario, begin, end = _episode(spec.net, spec.episode_seconds)
    regime = scenario.demand(DEMAND)
    warnings.filterwarnings("ignore", message=".*render_mode.*")  # PettingZoo's wrapper nags
    delta = int(spec.delta)
    env = sumo_rl.parallel_env(
        net_file=str(scenario.net), route_file=",".join(str(r) for r in regime.routes),
        begin_time=int(begin), num_seconds=int(end - begin), delta_time=delta, yellow_time=int(YELLOW_S),
        min_green=delta, max_green=int(MAX_GREEN_S), sumo_seed=spec.seed, use_gui=False,
        time_to_teleport=int(TIME_TO_TELEPORT_S), reward_fn="queue", sumo_warnings=False,
        add_system_info=spec.sumo_rl_info, add_per_agent_info=spec.sumo_rl_info,
        additional_sumo_cmd="--no-step-log true --duration-log.disable true")
    n_actions = {a: int(env.action_space(a).n) for a in env.possible_agents}
    probe.reset()
    steps = 0
    clock = EpisodeClock()
    obs, _ = env.reset(seed=spec.seed)
    counters = dict.fromkeys(env.possible_agents, 0)
    agents = len(obs)
    while env.agents:
        env.step(deterministic_actions(env.agents, n_actions, counters, spec.hold))
        steps += 1
    env.close()
    wall, cpu = clock.stop()
    return _result(spec, probe, wall, cpu, agents, steps, n_actions)


def work_plain(spec: WorkSpec) -> dict[str, Any]:
    import libsumo

    probe = Probe(libsumo)
    _, _, end = _episode(spec.net, spec.episode_seconds)
    cmd = plain_command(spec)
    clock = EpisodeClock()
    libsumo.start(cmd)
    libsumo.simulationStep(end)
    libsumo.close()
    wall, cpu = clock.stop()
    return _result(spec, probe, wall, cpu, 0, 0, {})


def work_replay(spec: WorkSpec) -> dict[str, Any]:
    import libsumo

    assert spec.replay is not None
    probe = Probe(libsumo)
    events = [(float(t), tls, state) for t, tls, state in json.loads(Path(spec.replay).read_text())]
    _, begin, end = _episode(spec.net, spec.episode_seconds)
    cmd = plain_command(spec)
    set_state = libsumo.trafficlight.setRedYellowGreenState
    clock = EpisodeClock()
    libsumo.start(cmd)
    now = begin
    for t, tls, state in events:
        if t > now:
            libsumo.simulationStep(t)
            now = t
        set_state(tls, state)
    libsumo.simulationStep(end)
    libsumo.close()
    wall, cpu = clock.stop()
    return _result(spec, probe, wall, cpu, 0, 0, {}, replayed_signal_changes=len(events))


def _result(spec: WorkSpec, probe: Probe, wall: float, cpu: float, agents: int, steps: int,
            n_actions: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {"spec": asdict(spec), "wall_s": wall, "cpu_s": cpu, "sumo_s": probe.sumo_s, "sumo_cpu_s": probe.cpu_s,
            "sumo_start_s": probe.totals["start"], "sumo_step_s": probe.totals["step"],
            "sumo_close_s": probe.totals["close"], "step_calls": probe.step_calls, "agents": agents,
            "decisions": steps, "agent_decisions": agents * steps, "green_phases": n_actions,
            "commands": probe.commands, "fingerprint": probe.fingerprint, **extra}


WORKERS: dict[str, Callable[[WorkSpec], dict[str, Any]]] = {
    "ours": work_ours, "ours-fixed": work_ours, "sumo-rl": work_sumo_rl, "plain": work_plain,
    "replay": work_replay,
}


def worker_main(spec_json: str, out: str) -> None:
    set_sumo_home()
    spec = WorkSpec(**json.loads(spec_json))
    Path(out).write_text(json.dumps(WORKERS[spec.system](spec)))


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
def run_worker(spec: WorkSpec) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (libsumo: one simulation per process)."""
    with tempfile.TemporaryDirectory(prefix="reled-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec)),
               "--worker-out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{spec.system} worker on {spec.net} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def run_binary(spec: WorkSpec) -> dict[str, Any]:
    """The ``sumo`` executable on the plain command: what a shell user would see."""
    set_sumo_home()
    cmd = plain_command(spec)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"sumo binary failed on {spec.net}: {proc.stderr.strip()[-500:]}")
    return {"spec": asdict(spec), "wall_s": wall, "cpu_s": cpu, "sumo_s": wall, "sumo_cpu_s": cpu,
            "sumo_start_s": 0.0, "sumo_step_s": wall,
            "sumo_close_s": 0.0, "step_calls": 0, "agents": 0, "decisions": 0, "agent_decisions": 0,
            "green_phases": {}, "commands": [cmd], "fingerprint": None}


def fmt_delta(delta: float | None) -> str:
    return "—" if delta is None else f"{delta:g} s"


def plan(nets: list[str], deltas: list[float], seed: int, hold: int, episode_seconds: float | None,
         sumo_rl_info: bool, all_red: float, tmp: Path, repeat: int) -> list[WorkSpec]:
    """One round of every measurement; ours runs before the replay of its own signals."""
    specs = []
    for net in nets:
        common = {"net": net, "seed": seed, "episode_seconds": episode_seconds}
        specs += [WorkSpec("plain", **common), WorkSpec("sumo-binary", **common)]
        for delta in deltas:
            log = str(tmp / f"signals-{net}-{delta:g}.json")
            specs += [
                WorkSpec("ours", delta=delta, hold=hold, record=log if repeat == 0 else None, all_red=all_red,
                         **common),
                WorkSpec("replay", delta=delta, replay=log, **common),
                WorkSpec("ours-fixed", delta=delta, hold=hold, all_red=all_red, **common),
                WorkSpec("sumo-rl", delta=delta, hold=hold, sumo_rl_info=sumo_rl_info, **common),
            ]
    return specs


def summarize(runs: list[dict[str, Any]], clock: str) -> list[dict[str, Any]]:
    """Medians per (net, decision interval, system) over the repeats; ``time``/``sumo``/``python`` on ``clock``."""
    episode_key, sumo_key = ("cpu_s", "sumo_cpu_s") if clock == "cpu" else ("wall_s", "sumo_s")
    groups: dict[tuple[str, float | None, str], list[dict[str, Any]]] = {}
    for run in runs:
        s = run["spec"]
        delta = s["delta"] if s["system"] in PER_DECISION else None
        groups.setdefault((s["net"], delta, s["system"]), []).append(run)
    rows = []
    for (net, delta, system), group in groups.items():
        times = [r[episode_key] for r in group]
        median = statistics.median(times)
        first = group[0]
        row = {
            "net": net, "delta_s": delta, "system": system, "repeats": len(group), "clock": clock,
            "agents": first["agents"], "decisions_per_episode": first["decisions"],
            "agent_decisions_per_episode": first["agent_decisions"],
            "time_s_median": median, "time_s_min": min(times), "time_s_max": max(times), "time_s_all": times,
            "wall_s_median": statistics.median(r["wall_s"] for r in group),
            "cpu_s_median": statistics.median(r["cpu_s"] for r in group),
            "sumo_s_median": statistics.median(r[sumo_key] for r in group),
            "sumo_step_s_median": statistics.median(r["sumo_step_s"] for r in group),
            "python_s_median": statistics.median(r[episode_key] - r[sumo_key] for r in group),
            "step_calls": first["step_calls"],
            "agent_decisions_per_s": first["agent_decisions"] / median if median > 0 else 0.0,
            "us_per_agent_decision": 1e6 * median / first["agent_decisions"] if first["agent_decisions"] else None,
            "commands": first["commands"], "fingerprint": first["fingerprint"],
        }
        if "obs_read_s" in first:
            row["obs_read_s_median"] = statistics.median(r["obs_read_s"] for r in group)
            row["timing"] = first["timing"]
        rows.append(row)
    return rows


def compare(rows: list[dict[str, Any]], nets: list[str], deltas: list[float]) -> tuple[list[dict], list[dict]]:
    """The ratios and the PASS/FAIL targets per net and decision interval."""
    def get(net: str, delta: float | None, system: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["net"] == net and r["delta_s"] == delta and r["system"] == system), None)

    comparisons, targets = [], []
    for net in nets:
        plain = get(net, None, "plain")
        for delta in deltas:
            ours, peer = get(net, delta, "ours"), get(net, delta, "sumo-rl")
            replay, fixed = get(net, delta, "replay"), get(net, delta, "ours-fixed")
            if not (ours and peer and plain and replay and fixed):
                continue
            overhead = _pct(ours, plain)
            same_traffic = _pct(ours, replay)
            fixed_overhead = _pct(fixed, plain)
            ratio = peer["time_s_median"] / ours["time_s_median"]
            comparisons.append({
                "net": net, "delta_s": delta, "overhead_vs_plain_pct": overhead,
                "overhead_vs_replay_pct": same_traffic, "fixed_overhead_vs_plain_pct": fixed_overhead,
                "sumo_rl_over_ours": ratio, "agents": ours["agents"],
                "ours_python_share_pct": 100.0 * ours["python_s_median"] / ours["time_s_median"],
                "ours_sumo_over_plain_pct": 100.0 * (ours["sumo_s_median"] - plain["time_s_median"])
                / plain["time_s_median"],
                "ours_us_per_agent_decision": ours["us_per_agent_decision"],
                "ours_python_us_per_agent_decision": 1e6 * ours["python_s_median"]
                / ours["agent_decisions_per_episode"],
                "sumo_rl_us_per_agent_decision": peer["us_per_agent_decision"],
                "sumo_rl_python_us_per_agent_decision": 1e6 * peer["python_s_median"]
                / peer["agent_decisions_per_episode"],
                "replay_matches_ours": _same_traffic(ours, replay),
                "fixed_matches_plain": _same_traffic(fixed, plain),
                "sumo_rl_traffic_matches_ours": _same_traffic(ours, peer),
            })
            targets += [
                {"net": net, "delta_s": delta, "kind": "brief", "value": ratio, "unit": "x",
                 "target": f"sumo-rl / ours >= {MIN_SPEED_RATIO:g}", "passed": ratio >= MIN_SPEED_RATIO},
                {"net": net, "delta_s": delta, "kind": "brief", "value": same_traffic, "unit": "%",
                 "target": f"ours vs replay <= {MAX_OVERHEAD_PCT:g} %", "passed": same_traffic <= MAX_OVERHEAD_PCT},
                {"net": net, "delta_s": delta, "kind": "same traffic", "value": fixed_overhead, "unit": "%",
                 "target": f"ours-fixed vs plain <= {MAX_OVERHEAD_PCT:g} %",
                 "passed": fixed_overhead <= MAX_OVERHEAD_PCT},
            ]
    return comparisons, targets


def _pct(row: dict[str, Any], floor: dict[str, Any]) -> float:
    """How much slower ``row`` is than ``floor``, in % of the floor."""
    return 100.0 * (row["time_s_median"] - floor["time_s_median"]) / floor["time_s_median"]


def _yes_no(ok: bool) -> str:
    return "yes" if ok else "no"


def _same_traffic(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["fingerprint"] is not None and a["fingerprint"] == b["fingerprint"]


def profile_summary(path: Path, top: int) -> list[dict[str, Any]]:
    """Top functions by own time, for attributing our Python overhead."""
    import pstats

    stats = pstats.Stats(str(path))
    entries = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append({"function": f"{Path(file).name}:{line}({func})", "calls": ncalls,
                        "tottime_s": tottime, "cumtime_s": cumtime})
    entries.sort(key=lambda e: e["tottime_s"], reverse=True)
    return entries[:top]


def print_report(console: Any, rows: list[dict], comparisons: list[dict], targets: list[dict],
                 profiles: dict[str, list[dict]], verbose: bool) -> None:
    from rich.table import Table

    clock = rows[0]["clock"] if rows else "cpu"
    table = Table(title=f"Environment throughput (median per episode, libsumo, {clock} seconds)", show_lines=False)
    for col, justify in [("net", "left"), ("decision", "right"), ("system", "left"), ("agents", "right"),
                         ("decisions/ep", "right"), (f"{clock} s/ep", "right"), ("min–max s", "right"),
                         ("SUMO s", "right"), ("Python s", "right"), ("obs read s", "right"),
                         ("SUMO steps", "right"), ("agent-dec/s", "right"), ("vs plain", "right")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    order = {s: k for k, s in enumerate(SYSTEMS)}
    plain_time = {r["net"]: r["time_s_median"] for r in rows if r["system"] == "plain"}
    nets = list(dict.fromkeys(r["net"] for r in rows))
    for net in nets:
        mine = sorted((r for r in rows if r["net"] == net),
                      key=lambda r: (r["delta_s"] is not None, -(r["delta_s"] or 0), order[r["system"]]))
        for r in mine:
            vs = (f"{100 * (r['time_s_median'] - plain_time[net]) / plain_time[net]:+.1f} %"
                  if net in plain_time and r["system"] != "plain" else "")
            table.add_row(
                net, fmt_delta(r["delta_s"]), r["system"], str(r["agents"] or ""),
                str(r["decisions_per_episode"] or ""), f"{r['time_s_median']:.3f}",
                f"{r['time_s_min']:.2f}–{r['time_s_max']:.2f}", f"{r['sumo_s_median']:.3f}",
                f"{r['python_s_median']:.3f}" if r["system"] in ENVS else "",
                f"{r['obs_read_s_median']:.3f}" if "obs_read_s_median" in r else "",
                str(r["step_calls"] or ""),
                f"{r['agent_decisions_per_s']:,.0f}" if r["agent_decisions_per_s"] else "", vs)
        table.add_section()
    console.print(table)

    ratios = Table(title="Where our time goes (same traffic: replay reproduces ours, ours-fixed reproduces plain)")
    for col in ("net", "decision", "ours vs plain", "our SUMO vs plain", "ours vs replay", "ours-fixed vs plain",
                "Python share of ours", "sumo-rl / ours", "replay = ours", "ours-fixed = plain", "sumo-rl = ours"):
        ratios.add_column(col, justify="right")
    for c in comparisons:
        ratios.add_row(c["net"], fmt_delta(c["delta_s"]), f"{c['overhead_vs_plain_pct']:+.1f} %",
                       f"{c['ours_sumo_over_plain_pct']:+.1f} %", f"{c['overhead_vs_replay_pct']:+.1f} %",
                       f"{c['fixed_overhead_vs_plain_pct']:+.1f} %", f"{c['ours_python_share_pct']:.1f} %",
                       f"{c['sumo_rl_over_ours']:.3f}x", _yes_no(c["replay_matches_ours"]),
                       _yes_no(c["fixed_matches_plain"]), _yes_no(c["sumo_rl_traffic_matches_ours"]))
    console.print(ratios)

    scaling = Table(title="Cost per agent-decision as the number of lights grows (µs; Python = outside SUMO's calls)")
    for col in ("net", "decision", "lights", "ours", "ours: Python", "sumo-rl", "sumo-rl: Python"):
        scaling.add_column(col, justify="right")
    for c in sorted(comparisons, key=lambda c: (c["delta_s"], c["agents"])):
        scaling.add_row(c["net"], fmt_delta(c["delta_s"]), str(c["agents"]), f"{c['ours_us_per_agent_decision']:,.0f}",
                        f"{c['ours_python_us_per_agent_decision']:,.0f}", f"{c['sumo_rl_us_per_agent_decision']:,.0f}",
                        f"{c['sumo_rl_python_us_per_agent_decision']:,.0f}")
    console.print(scaling)

    checks = Table(title="Targets (brief: the issue's two; same traffic: ours-fixed on the nets' own programs)")
    for col in ("net", "decision", "kind", "target", "value", "result"):
        checks.add_column(col)
    for t in targets:
        value = f"{t['value']:+.1f} %" if t["unit"] == "%" else f"{t['value']:.3f}x"
        checks.add_row(t["net"], fmt_delta(t["delta_s"]), t["kind"], t["target"], value,
                       "[green]PASS[/green]" if t["passed"] else "[red]FAIL[/red]")
    console.print(checks)

    for key, entries in profiles.items():
        prof = Table(title=f"cProfile of ours, {key} (top by own time; profiling inflates Python)")
        for col in ("function", "calls", "own s", "cum s"):
            prof.add_column(col)
        for e in entries:
            prof.add_row(e["function"], str(e["calls"]), f"{e['tottime_s']:.3f}", f"{e['cumtime_s']:.3f}")
        console.print(prof)

    if verbose:
        console.rule("SUMO command lines (first repeat)")
        for r in rows:
            for cmd in r["commands"]:
                console.print(f"[bold]{r['net']} {fmt_delta(r['delta_s'])} {r['system']}[/bold]: "
                              f"{shlex.join(cmd)}", soft_wrap=True, highlight=False)


def plot_scaling(comparisons: list[dict[str, Any]], path: Path, clock: str) -> None:
    """µs per agent-decision against the number of lights, ours and sumo-rl, total and Python."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("whole environment (SUMO included)", "ours_us_per_agent_decision", "sumo_rl_us_per_agent_decision"),
              ("Python only (outside SUMO's calls)", "ours_python_us_per_agent_decision",
               "sumo_rl_python_us_per_agent_decision"))
    for ax, (title, ours_key, peer_key) in zip(axes, panels, strict=True):
        for delta in sorted({c["delta_s"] for c in comparisons}):
            mine = sorted((c for c in comparisons if c["delta_s"] == delta), key=lambda c: c["agents"])
            lights = [c["agents"] for c in mine]
            ax.scatter(lights, [c[ours_key] for c in mine], marker="o", label=f"ours ({fmt_delta(delta)})")
            ax.scatter(lights, [c[peer_key] for c in mine], marker="s", label=f"sumo-rl ({fmt_delta(delta)})")
            for c in mine:
                ax.annotate(c["net"], (c["agents"], c[ours_key]), fontsize=7, xytext=(4, 2),
                            textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("controlled lights in the net")
        ax.set_ylabel(f"{clock} µs per agent-decision")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Environment cost per agent-decision, one episode per net (median of repeats)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def default_nets() -> list[str]:
    """Every RESCO net, the generated 6×6 grid and the cities imported on this machine."""
    from trainer.scenarios.registry import imported_names

    return [*RESCO_NETS, *GENERATED_NETS, *sorted(imported_names())]


def code_version() -> dict[str, Any]:
    """Commit and uncommitted changes of the measured code: the environment changes often."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=False).stdout
        except OSError:
            return ""

    dirty = git("status", "--porcelain", "--", "trainer", "edge_runtime").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
            "dirty_files": [ln[3:] for ln in dirty]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Episode throughput of RELED's TrafficSignalEnv vs sumo-rl and plain SUMO (libsumo), "
                    "at several decision intervals, with PASS/FAIL targets.",
        epilog=f"Targets: sumo-rl time / our time >= {MIN_SPEED_RATIO:g}; ours at most {MAX_OVERHEAD_PCT:g} % "
               f"over the replay of our signal changes in bare SUMO (same traffic). Policy: agent a at decision k "
               f"proposes green phase (k // hold) % n_green_phases(a), in both environments.")
    p.add_argument("--nets", nargs="+", default=None, metavar="NET",
                   help="scenarios (default: every RESCO net, grid6x6 and the imported cities on this machine)")
    p.add_argument("--deltas", nargs="+", type=float, default=list(DEFAULT_DELTAS), metavar="S",
                   help="decision intervals in s; min green equals it on both envs (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="episodes per system; medians shown (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="SUMO seed shared by every run (default: 0)")
    p.add_argument("--hold", type=int, default=3,
                   help="decisions each proposed phase is held by the deterministic policy (default: 3)")
    p.add_argument("--episode-seconds", type=float, default=None,
                   help="simulated seconds per episode (default: the scenario's begin..end)")
    p.add_argument("--sumo-rl-info", action="store_true",
                   help="keep sumo-rl's per-step system/agent info (its default; off = leanest sumo-rl)")
    p.add_argument("--all-red", type=float, default=0.0, metavar="S",
                   help="our all-red clearance in s; 0 (default) gives the signal sequence sumo-rl shows "
                        "(it has no all-red), hence nearly the same traffic; 2 is RELED's default timing")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also run ours once per net/interval under cProfile and print the top N functions")
    p.add_argument("--clock", choices=CLOCKS, default="cpu",
                   help="what the ratios compare: this process's CPU seconds (robust to other jobs on the "
                        "machine) or wall seconds (default: %(default)s; both are in the JSON)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every figure to this JSON file")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="draw the cost per agent-decision against the number of lights into this PNG")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when one of the brief's targets fails")
    p.add_argument("--verbose", "-v", action="store_true", help="print the exact SUMO command lines")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.hold < 1:
        p.error("--repeats and --hold must be >= 1")
    if any(d <= YELLOW_S or d != int(d) for d in args.deltas):
        p.error(f"decision intervals must be whole seconds > yellow ({YELLOW_S:g} s): sumo-rl steps 1 s")
    if args.all_red < 0:
        p.error("--all-red must be >= 0")
    if args.episode_seconds is not None and args.episode_seconds <= 0:
        p.error("--episode-seconds must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.worker_out)
        return 0
    if args.nets is None:
        args.nets = default_nets()
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: keep the wide tables readable
        console = Console(width=200)
    runs: list[dict[str, Any]] = []
    profiles: dict[str, list[dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reled-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        for repeat in range(args.repeats):
            specs = plan(args.nets, args.deltas, args.seed, args.hold, args.episode_seconds,
                         args.sumo_rl_info, args.all_red, tmp, repeat)
            for k, spec in enumerate(specs):
                label = f"repeat {repeat + 1}/{args.repeats}, {k + 1}/{len(specs)}: {spec.net} " \
                        f"{fmt_delta(spec.delta if spec.system in PER_DECISION else None)} {spec.system}"
                with console.status(label):
                    run = run_binary(spec) if spec.system == "sumo-binary" else run_worker(spec)
                run["repeat"] = repeat
                runs.append(run)
                console.log(f"{label}: {run['cpu_s']:.3f} s CPU, {run['wall_s']:.3f} s wall", highlight=False)
        if args.profile:
            for net in args.nets:
                for delta in args.deltas:
                    out = tmp / f"profile-{net}-{delta:g}.prof"
                    with console.status(f"profiling ours on {net} at {delta:g} s"):
                        run_worker(WorkSpec("ours", net, args.seed, delta=delta, hold=args.hold,
                                            episode_seconds=args.episode_seconds, all_red=args.all_red,
                                            profile=str(out)))
                    profiles[f"{net} {delta:g} s"] = profile_summary(out, args.profile)
    rows = summarize(runs, args.clock)
    comparisons, targets = compare(rows, args.nets, args.deltas)
    print_report(console, rows, comparisons, targets, profiles, args.verbose)
    all_passed = all(t["passed"] for t in targets if t["kind"] == "brief")
    same_traffic_passed = all(t["passed"] for t in targets if t["kind"] == "same traffic")
    console.print(f"brief targets: {'all PASS' if all_passed else 'some FAIL'}; same-traffic targets: "
                  f"{'all PASS' if same_traffic_passed else 'some FAIL'}; "
                  f"benchmark took {time.perf_counter() - started:.0f} s")
    if args.json:
        from importlib.metadata import PackageNotFoundError, version

        try:
            sumo_version = version("eclipse-sumo")
        except PackageNotFoundError:
            sumo_version = "unknown"
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "config": {"nets": args.nets, "deltas_s": args.deltas, "repeats": args.repeats, "seed": args.seed,
                       "hold": args.hold, "episode_seconds": args.episode_seconds, "demand": DEMAND,
                       "clock": args.clock, "sumo_rl_info": args.sumo_rl_info, "yellow_s": YELLOW_S,
                       "all_red_s": args.all_red,
                       "max_green_s": MAX_GREEN_S, "time_to_teleport_s": TIME_TO_TELEPORT_S,
                       "policy": "agent a, decision k: (k // hold) % n_green_phases(a)",
                       "sumo_version": sumo_version,
                       "python": platform.python_version(), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "code": code_version()},
            "results": rows, "comparisons": comparisons, "targets": targets, "all_passed": all_passed,
            "same_traffic_passed": same_traffic_passed,
            "profiles": profiles, "runs": runs,
        }, indent=2))
        console.print(f"wrote {args.json}")
    if args.plot and comparisons:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_scaling(comparisons, args.plot, args.clock)
        console.print(f"wrote {args.plot}")
    return 1 if args.strict and not all_passed else 0


if __name__ == "__main__":
    sys.exit(main())
