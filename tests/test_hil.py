"""Hardware-in-the-loop: SUMO as the street, real daemons on a real Mosquitto as the controllers.

Unit tests check the independent audit and the plant's checks of an answer; the rest run `reled hil run` against
a fleet of daemon processes (grid2x2, 4 lights) and break things mid-run: a daemon killed and restarted, the
broker killed and restarted, a device answering garbage or impossible phases.
"""

from __future__ import annotations

import asyncio
import json
import queue
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.protocol import ProtocolError
from edge_runtime.shield import SafetyShield, SignalState, SignalTiming, Stage, transition_state
from trainer.hil.audit import SignalAudit

GREENS = ("GGrr", "rrGG")
TIMING = SignalTiming(yellow=3.0, all_red=2.0, min_green=10.0, max_green=60.0)


# -- the audit ---------------------------------------------------------------------------------------------
def test_audit_passes_every_sequence_the_shield_makes() -> None:
    """Random proposals through the shield, every state it enters audited: nothing to flag."""
    rng = random.Random(0)
    greens = ("GGgrrr", "rrGGgr", "grrrGG")
    shield = SafetyShield(3, TIMING)
    audit = SignalAudit(TIMING, greens, greens[0], 0.0)
    for step in range(2000):
        now = step * 2.0
        for state in [*shield.advance(now), *shield.propose(rng.randrange(3), now)]:
            audit.observe(state.since, transition_state(greens, state.stage, state.phase, state.target))
    assert audit.total == 0, audit.violations


@pytest.mark.parametrize(("sequence", "kind"), [
    ([(5.0, "rrGG")], "no_yellow"),  # straight from one green to the other
    ([(12.0, "yyrr"), (13.0, "rrrr"), (16.0, "rrGG")], "short_yellow"),
    ([(12.0, "yyrr"), (15.0, "rrrr"), (16.0, "rrGG")], "short_all_red"),
    ([(4.0, "yyrr"), (7.0, "rrrr"), (9.0, "rrGG")], "short_green"),
    ([(12.0, "Ggrr")], "no_yellow"),  # a protected green became permissive without yellow
])
def test_audit_flags_each_violation(sequence: list[tuple[float, str]], kind: str) -> None:
    audit = SignalAudit(TIMING, GREENS, "GGrr", 0.0)
    for t, links in sequence:
        audit.observe(t, links)
    assert audit.violations[kind] >= 1, audit.violations


def test_answer_checks_refuse_what_cannot_be_shown() -> None:
    from trainer.hil.bridge import parse_answer

    class Light:
        tls_id, green_states, n_phases = "A", GREENS, 2

        @staticmethod
        def state_string(state: SignalState) -> str:
            return transition_state(GREENS, state.stage, state.phase, state.target)

    def answer(action: int = 1, **state: Any) -> dict[str, Any]:
        entry = {"stage": 1, "phase": 0, "target": 1, "since": 100.0, "links": "yyrr"} | state
        return {"action": action, "states": [entry]}

    assert parse_answer(answer(), 100.0, 110.0, Light)[0].links == "yyrr"
    for bad in (answer(action=2), answer(since=110.0), answer(since=99.0), answer(links="yyr"), answer(target=5),
                answer(links="GGGG")):  # heads that do not show the state claimed
        with pytest.raises(ProtocolError):
            parse_answer(bad, 100.0, 110.0, Light)


def test_device_adopts_what_the_heads_show() -> None:
    """After the plant ran its fallback, the controller's shield starts from the shown state (a resync)."""
    import numpy as np

    from edge_runtime.device.hil import HilBridge, PlantRequest

    bridge = HilBridge(link=None, device="dev0", n_phases=2)  # type: ignore[arg-type]
    shield = SafetyShield(2, TIMING, clear_first=True)
    shown = SignalState(Stage.GREEN, 0, 0, 0.0)
    first = PlantRequest("run1", 0, 0.0, 10.0, np.zeros((2, 3)), shown, False)
    assert bridge.align(shield, first) is False  # a new run: adopted, not counted
    assert shield.state == shown and not shield.clearing
    assert bridge.align(shield, first) is False  # the same: nothing to do
    fallback = SignalState(Stage.GREEN, 1, 1, 35.0)
    assert bridge.align(shield, PlantRequest("run1", 5, 50.0, 60.0, np.zeros((2, 3)), fallback, False)) is True
    assert shield.state == fallback and bridge.resyncs == 1


def test_audit_with_overlaps_and_no_all_red() -> None:
    """RESCO-style timing (no all-red) and links that never turn green ('s', 'o'): legal changes pass, a green of
    two phases at once is a conflict."""
    greens = ("GGrsO", "rrGsO")
    timing = SignalTiming(yellow=3.0, all_red=0.0, min_green=7.0, max_green=60.0)
    audit = SignalAudit(timing, greens, greens[0], 0.0)
    for t, links in ((7.0, "yyrsO"), (10.0, "rrGsO"), (17.0, "rryso"), (20.0, "GGrsO")):
        audit.observe(t, links)
    assert audit.total == 0, audit.violations
    audit.observe(40.0, "GGGsO")
    assert audit.violations["conflict"] == 1


def test_plant_fallback_is_safe_from_any_shown_state() -> None:
    """The fixed-time plan the plant runs for a silent device starts from whatever the heads show: audited over
    random shown states and decision times, nothing is flagged."""
    from edge_runtime.shield import fixed_time_choice

    rng = random.Random(1)
    greens = ("GGgrrr", "rrGGgr", "grrrGG")
    longest = {Stage.GREEN: 60.0, Stage.YELLOW: 2.9, Stage.ALL_RED: 1.9}
    for _ in range(300):
        stage, phase = Stage(rng.randrange(3)), rng.randrange(3)
        target = phase if stage is Stage.GREEN else (phase + rng.randrange(1, 3)) % 3
        state = SignalState(stage, phase, target, rng.uniform(0, 50))
        audit = SignalAudit(TIMING, greens, transition_state(greens, stage, phase, target), state.since)
        if stage is Stage.ALL_RED:
            audit.yellow_ended = state.since
        t = state.since + rng.uniform(0, longest[stage])
        shield = SafetyShield(3, TIMING)
        shield.sync(state)
        entered = [*shield.propose(fixed_time_choice(shield, t, 30.0), t), *shield.advance(t + 10 - 1e-9)]
        for s in entered:
            audit.observe(s.since, transition_state(greens, s.stage, s.phase, s.target))
        assert audit.total == 0, (state, t, entered, audit.violations)


@pytest.mark.parametrize("change", [
    {"until": 1e9}, {"t": 5.0, "shown": {"since": 6.0}}, {"per_phase": [[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]},
    {"per_phase": [[1.0, 2.0, 3.0]] * 3}, {"per_phase": [[1.0, 2.0, 1e300], [0.0, 0.0, 0.0]]},
    {"shown": {"phase": 5}}, {"until": 5.0},
])
def test_device_refuses_hostile_plant_requests(change: dict[str, Any]) -> None:
    """Requests a controller must not act on: a span that would make it plan hours of states, a shown state from
    the future, readings of the wrong shape or size, phases it lacks."""
    from edge_runtime.device.hil import HilBridge
    from edge_runtime.protocol import encode

    request = {"run": "r1", "seq": 0, "t": 100.0, "until": 110.0, "per_phase": [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]],
               "shown": {"stage": 0, "phase": 0, "target": 0, "since": 90.0, "clearing": False}}
    bridge = HilBridge(link=None, device="dev0", n_phases=2)  # type: ignore[arg-type]
    bridge.on_obs(encode(request))
    assert bridge.take() is not None
    shown = {**request["shown"], **change.pop("shown", {})}
    with pytest.raises(ProtocolError):
        bridge.on_obs(encode({**request, **change, "shown": shown}))
    assert bridge.take() is None


def test_gather_takes_each_devices_first_word_on_this_request() -> None:
    """A late answer to an earlier request is counted late, not refused for this one; a device refused once is not
    answered again; a garbage message answers the request it arrives during."""
    from edge_runtime.mqtt import Message
    from edge_runtime.protocol import encode
    from trainer.hil.bridge import PlantLink

    plant = PlantLink.__new__(PlantLink)
    plant.run, plant.sent, plant.late = "r1", {}, {}

    class Inbox(queue.Queue):
        pass

    plant.link = type("L", (), {"inbox": Inbox()})()

    def act(device: str, seq: int, **extra: Any) -> None:
        body = {"run": "r1", "seq": seq, "t": 0.0, "action": 0, "source": 0, "override": False, "resync": False,
                "states": []} | extra
        plant.link.inbox.put(Message(f"reled/v1/dev/{device}/hil/act", encode(body), False))

    act("a", 3, action=99)  # an invalid answer to an earlier request: late, not this request's refusal
    act("a", 4)
    plant.link.inbox.put(Message("reled/v1/dev/b/hil/act", b"\x00garbage", False))
    act("b", 4)  # too late: b's word on this request was the garbage
    act("c", 4, action=9)  # schema: action outside 0..7
    answers, refused = plant.gather(4, {"a", "b", "c"}, time.perf_counter() + 1.0)
    assert set(answers) == {"a"} and set(refused) == {"b", "c"}
    assert plant.late == {"a": 1}


# -- against a fleet of daemons ----------------------------------------------------------------------------
EPISODE = "600"  # simulated seconds: 60 decisions


def start_hil_fleet(local_fleet: Any, model: Any, ports: dict[str, int] | None = None) -> Any:
    """Four HIL daemons (grid2x2) on a fresh broker, ``model`` staged on each (it commits during the first run);
    ``ports``: a device that reaches the broker through another port (a delaying link)."""
    lights = sorted(model.phase_tables)
    for k, light in enumerate(lights):
        port = (ports or {}).get(f"dev{k}", local_fleet.port)
        local_fleet.write_device(f"dev{k}", light, model.phase_tables[light], groups=("hil",), hil=True,
                                 probation={"decisions": 3}, broker={"port": port})
    local_fleet.init_keys()
    local_fleet.start_broker()
    for k in range(len(lights)):
        local_fleet.start_daemon(f"dev{k}")
    local_fleet.check_daemons(settle=0.5)
    local_fleet.edge("deploy", "--group", "hil", "--model", str(model.path), "--until", "staged", "--timeout", "60",
                     check=True)
    local_fleet.lights = lights
    return local_fleet


@pytest.fixture
def hil_fleet(local_fleet: Any, fleet_models: dict[int, Any]) -> Any:
    return start_hil_fleet(local_fleet, fleet_models[1])


def hil_command(reled_command: list[str], fleet: Any, out: Path, *extra: str) -> list[str]:
    return [*reled_command, "hil", "run", "--scenario", "grid2x2", "--fleet", str(fleet.root), "--out", str(out),
            "--episode-seconds", EPISODE, *extra]


def read_report(out: Path) -> dict[str, Any]:
    return json.loads((out / "hil_report.json").read_text())


@pytest.fixture
def hil_background(spawn: Callable[..., subprocess.Popen], tmp_path: Path) -> Callable[..., subprocess.Popen]:
    """Start `reled hil run` without waiting (stopped at teardown by ``spawn`` if still running)."""

    def start(command: list[str]) -> subprocess.Popen:
        return spawn(command, stdout=(tmp_path / "hil.log").open("w"), stderr=subprocess.STDOUT)

    return start


def test_hil_run_matches_eval_of_the_same_onnx_policy(hil_fleet: Any, fleet_models: dict[int, Any], reled: Any,
                                                       reled_command: list[str], tmp_path: Path) -> None:
    """Every decision answered in time by the daemons gives the very traffic `reled eval --policy X.onnx` gives;
    `--compare` puts both in one table."""
    evaluated = tmp_path / "eval.json"
    proc = reled("eval", "--scenario", "grid2x2", "--policy", str(fleet_models[1].path), "--controller", "fixed",
                 "--seeds", "1", "--episode-seconds", EPISODE, "--json", str(evaluated))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "hil"
    proc = subprocess.run(hil_command(reled_command, hil_fleet, out, "--speed", "max", "--deadline-ms", "5000",
                                      "--compare", str(evaluated)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HIL: 4 controller processes over MQTT" in proc.stdout and "fixed" in proc.stdout
    report = read_report(out)
    assert report["total_violations"] == 0
    assert all(d["answered"] == report["decisions"] and d["missing"] == 0 for d in report["devices"].values())
    for png in ("hil_timeline.png", "hil_vs_eval.png"):
        assert (out / png).stat().st_size > 10_000
    episode = next(e for e in json.loads(evaluated.read_text())["episodes"] if e["controller"].startswith("onnx:"))
    for key in ("avg_delay", "avg_travel_time", "throughput", "vehicles"):
        assert report["metrics"][key] == pytest.approx(episode[key]), key
    assert hil_fleet.state("dev0")["state"] == "COMMITTED"  # probation ran on the plant's decisions


def test_killed_daemon_falls_back_and_rejoins(hil_fleet: Any, hil_background: Callable[..., subprocess.Popen],
                                             reled_command: list[str], tmp_path: Path,
                                             wait_until: Callable[..., Any]) -> None:
    out = tmp_path / "hil"
    proc = hil_background(hil_command(reled_command, hil_fleet, out, "--speed", "40", "--deadline-ms", "400"))
    # the daemon's probation commits on the plant's decisions: then the run is under way
    wait_until(lambda: hil_fleet.state("dev1").get("state") == "COMMITTED", 60, "dev1 committed during the run")
    hil_fleet.kill_daemon("dev1")
    time.sleep(2.0)  # 80 simulated seconds without it
    hil_fleet.start_daemon("dev1")
    assert proc.wait(timeout=300) == 0, (tmp_path / "hil.log").read_text()
    report = read_report(out)
    dev1 = report["devices"]["dev1"]
    assert dev1["missing"] >= 3, dev1  # it was away for several decisions...
    assert dev1["answered"] + dev1["missing"] + dev1["invalid"] == report["decisions"]
    streaks = [e for e in report["events"] if e["device"] == "dev1"]
    assert streaks and streaks[0]["kind"] == "missing"
    last_decision = report["timeline"]["t"][-1]
    assert streaks[-1]["last_t"] < last_decision - 50, "dev1 never drove its light again"  # ...and came back
    assert report["total_violations"] == 0
    others = [d for name, d in report["devices"].items() if name != "dev1"]
    assert all(d["missing"] == 0 for d in others), others


def test_broker_restart_mid_run(hil_fleet: Any, hil_background: Callable[..., subprocess.Popen],
                                reled_command: list[str], tmp_path: Path, wait_until: Callable[..., Any]) -> None:
    """The broker dies and comes back: no daemon exits, and every light is driven again within 10 s (wall)."""
    out = tmp_path / "hil"
    proc = hil_background(hil_command(reled_command, hil_fleet, out, "--speed", "30", "--deadline-ms", "400"))
    wait_until(lambda: hil_fleet.state("dev0").get("state") == "COMMITTED", 60, "dev0 committed during the run")
    killed_at = time.monotonic()
    hil_fleet.kill_broker()
    hil_fleet.start_broker()
    restarted = time.monotonic() - killed_at
    assert proc.wait(timeout=300) == 0, (tmp_path / "hil.log").read_text()
    assert all(p.poll() is None for p in hil_fleet.daemons.values()), "a daemon exited"
    report = read_report(out)
    line = report["timeline"]
    full = len(hil_fleet.lights)
    outage = [k for k, n in enumerate(line["answered"]) if n < full]
    assert outage, "the broker restart went unnoticed: the test did not test anything"
    back = next(k for k in range(outage[0], len(line["t"])) if line["answered"][k] == full)
    assert all(n == full for n in line["answered"][back:]), "a light was lost again after the recovery"
    recovery = line["wall_s"][back] - line["wall_s"][outage[0]]
    print(f"broker restart: {len(outage)} decisions without every light driven, all driven again after "
          f"{recovery:.2f} s wall (the restart itself took {restarted:.2f} s)")
    assert recovery <= 10.0 + restarted, f"lights driven again only after {recovery:.1f} s"
    assert report["total_violations"] == 0


@pytest.mark.parametrize("answer", ["garbage", "bad_phase"])
def test_device_answering_nonsense_is_refused(local_fleet: Any, fleet_models: dict[int, Any], answer: str,
                                              hil_background: Callable[..., subprocess.Popen],
                                              reled_command: list[str], tmp_path: Path) -> None:
    """A device with valid credentials answers every request with garbage or a phase its light lacks: each answer
    is refused and counted, its light runs the fixed-time plan, the run completes safely."""
    from edge_runtime.credentials import read_password
    from edge_runtime.keys import KeyFolder
    from edge_runtime.mqtt import BrokerAddress, Link
    from edge_runtime.protocol import decode_json, device_topic, encode

    model = fleet_models[1]
    light = sorted(model.phase_tables)[0]
    local_fleet.write_device("rogue", light, model.phase_tables[light], sensor={"adapter": "hil"},
                             actuator={"adapter": "hil"})
    local_fleet.init_keys()
    local_fleet.start_broker()
    secret = read_password(KeyFolder(local_fleet.keys).secret_path("rogue"))
    rogue = Link(BrokerAddress("127.0.0.1", local_fleet.port, "rogue", secret), "reled-rogue",
                 [device_topic("rogue", "hil/obs")]).start()
    out = tmp_path / "hil"
    hil = hil_background(hil_command(reled_command, local_fleet, out, "--speed", "max", "--deadline-ms", "1000"))
    deadline = time.monotonic() + 300
    try:
        while hil.poll() is None and time.monotonic() < deadline:
            try:
                message = rogue.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            request = decode_json(message.payload)
            body = b"\x00{not json" if answer == "garbage" else encode({
                "run": request["run"], "seq": request["seq"], "t": request["t"], "action": 7, "source": 0,
                "override": False, "resync": False, "states": []})
            rogue.publish(device_topic("rogue", "hil/act"), body, qos=0)
    finally:
        rogue.close()
    assert hil.wait(timeout=60) == 0, (tmp_path / "hil.log").read_text()
    report = read_report(out)
    row = report["devices"]["rogue"]
    assert row["invalid"] == report["decisions"] and row["answered"] == 0, row
    assert report["total_violations"] == 0
    assert report["events"][0]["kind"] == "invalid"
    assert len(report["undriven"]) == 3  # the other lights had no device: the plant's plan ran them


async def _forward_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived, in order."""
    loop = asyncio.get_running_loop()
    held: asyncio.Queue = asyncio.Queue()
    releasing = asyncio.ensure_future(_release(held, writer, loop))
    while True:
        data = await reader.read(65536)
        held.put_nowait((loop.time() + delay, data))
        if not data:
            break
    await releasing


async def _release(held: asyncio.Queue, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop) -> None:
    while True:
        due, data = await held.get()
        if not data:
            break
        await asyncio.sleep(max(0.0, due - loop.time()))
        writer.write(data)
        await writer.drain()
    writer.close()


class DelayingLink:
    """A TCP hop that holds every byte for ``delay`` seconds each way, in order: what `tc netem delay` does, for
    kernels without netem (this machine's): the daemon behind it talks to the broker over a real, slow link."""

    def __init__(self, target_port: int, delay: float):
        from edge_runtime.fleet.local import free_port

        self.port, self.target_port, self.delay = free_port(target_port), target_port, delay
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)
        self.thread.start()
        assert self.started.wait(10), "the delaying link did not start"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        try:
            await asyncio.gather(_forward_late(reader, up_writer, self.delay),
                                 _forward_late(up_reader, writer, self.delay))
        finally:
            writer.close()
            up_writer.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.stopping = asyncio.Event()
        self.started.set()
        async with server:
            await self.stopping.wait()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def close(self) -> None:
        """Stop listening, drop the connections (the daemon behind it sees its link cut) and end the thread."""
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture
def delaying_link() -> Iterator[Callable[[int, float], DelayingLink]]:
    links: list[DelayingLink] = []

    def start(port: int, delay: float) -> DelayingLink:
        links.append(DelayingLink(port, delay))
        return links[-1]

    yield start
    for link in links:
        link.close()


def test_link_delay_beyond_the_deadline(local_fleet: Any, fleet_models: dict[int, Any],
                                        delaying_link: Callable[[int, float], DelayingLink], reled_command: list[str],
                                        tmp_path: Path) -> None:
    """dev2 sits behind a link holding every packet 200 ms each way (400 ms round trip) and the plant waits 150 ms:
    each of its answers is late, counted, and its light runs the fixed-time plan; the run completes safely and the
    other devices are unaffected. (`fleet up --netem "delay 200ms"` gives the same link where the kernel has netem;
    this machine's has not, so the test delays in a user-space hop.)"""
    slow = delaying_link(local_fleet.port, 0.2)
    fleet = start_hil_fleet(local_fleet, fleet_models[1], ports={"dev2": slow.port})
    out = tmp_path / "hil"
    proc = subprocess.run(hil_command(reled_command, fleet, out, "--speed", "max", "--deadline-ms", "150"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = read_report(out)
    dev2 = report["devices"]["dev2"]
    assert dev2["answered"] == 0 and dev2["missing"] == report["decisions"], dev2
    assert dev2["late"] >= report["decisions"] // 2, dev2  # its answers did come, after the deadline
    assert all(d["missing"] == 0 for name, d in report["devices"].items() if name != "dev2")
    assert report["total_violations"] == 0
    assert [e["kind"] for e in report["events"] if e["device"] == "dev2"] == ["missing"]


def test_hil_run_refuses_bad_input(assert_one_line_error: Callable[..., None], reled: Any, tmp_path: Path) -> None:
    """Each is one line and exit code 2, before SUMO or MQTT is touched."""
    bad = tmp_path / "eval.json"
    bad.write_text("{}")
    base = ("hil", "run", "--scenario", "grid2x2", "--fleet", str(tmp_path))
    assert_one_line_error(reled(*base), "is not a fleet folder")
    assert_one_line_error(reled(*base, "--speed", "0"), "--speed")
    assert_one_line_error(reled(*base, "--speed", "fast"), "--speed")
    assert_one_line_error(reled(*base, "--compare", str(bad)), "not a `reled eval --json` file")
    assert_one_line_error(reled(*base, "--deadline-ms", "0"), "--deadline-ms")
