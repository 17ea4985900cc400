"""SED building blocks on constructed cases: bound estimators, answer rules, subsets, the store."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.shield import SignalTiming
from trainer.sed.answers import AnswerError, AnswerFormat, TimingPlan
from trainer.sed.bounds import external_volatility, nonstationarity_bound, one_hot, policy_divergence, subset_score
from trainer.sed.clusters import RoadGraph, boundary_lanes, partition
from trainer.sed.llm import HttpBackend, resolve_model
from trainer.sed.store import COLUMNS, load_demos, write_demos

TIMING = SignalTiming(yellow=3, all_red=2, min_green=10, max_green=60)


# -- bounds ---------------------------------------------------------------------------------------
def test_constant_inflow_has_zero_volatility_and_bursts_do_not():
    assert external_volatility(np.full(50, 4.0), boundary_lanes=4, decision_seconds=10) == pytest.approx(0.0, abs=1e-12)
    bursty = np.tile([0.0, 8.0], 25)
    eps = external_volatility(bursty, boundary_lanes=4, decision_seconds=10)
    assert eps == pytest.approx(4.0 / (4 * 0.5 * 10))  # std 4 vehicles over a capacity of 20 per step


def test_divergence_is_zero_for_the_expert_itself_and_one_for_disjoint_choices():
    actions = np.array([0, 2, 1, 1])
    expert = one_hot(actions, MAX_PHASES)
    assert policy_divergence(expert, expert) == 0.0
    assert policy_divergence(one_hot((actions + 1) % 3, MAX_PHASES), expert) == pytest.approx(1.0)
    uniform = np.full((4, MAX_PHASES), 1 / MAX_PHASES)
    assert policy_divergence(uniform, expert) == pytest.approx(1 - 1 / MAX_PHASES)


def test_bound_grows_with_each_term():
    base = nonstationarity_bound(0.1, 0.2, gamma=0.9)
    assert nonstationarity_bound(0.2, 0.2, gamma=0.9) > base
    assert nonstationarity_bound(0.1, 0.3, gamma=0.9) > base
    assert nonstationarity_bound(0.1, 0.2, gamma=0.95) > base
    assert nonstationarity_bound(0.0, 0.0, gamma=0.9) == 0.0
    assert nonstationarity_bound(0.5, 0.0, gamma=0.9) == pytest.approx(5.0)  # ε / (1 − γ)
    assert nonstationarity_bound(0.0, 0.1, gamma=0.5, r_max=2.0) == pytest.approx(2 * 0.5 * 2 / 0.25 * 0.1)
    assert subset_score(-3.0, 10.0, lam=0.1) == pytest.approx(-4.0)
    with pytest.raises(ValueError):
        nonstationarity_bound(0.1, 0.1, gamma=1.0)


# -- answers --------------------------------------------------------------------------------------
def test_plan_answers_are_checked_against_phases_and_timing_bounds():
    fmt = AnswerFormat("plan", ("I1", "I2"), (3, 2), TIMING)
    plans = fmt.parse('{"I1":{"order":[2,0,1],"green":[20,15,30],"offset":10},'
                      '"I2":{"order":[0,1],"green":[10,60],"offset":0}}')
    assert plans["I1"] == TimingPlan((2, 0, 1), (20, 15, 30), 10)
    for bad, why in [
        ('{"I1":', "not JSON"),
        ('{"I1":{"order":[0,1,2],"green":[20,15,30],"offset":0}}', "keys"),
        ('{"I1":{"order":[0,0,1],"green":[20,15,30],"offset":0},"I2":{"order":[0,1],"green":[10,60],"offset":0}}',
         "each phase"),
        ('{"I1":{"order":[0,1,2],"green":[20,15,90],"offset":0},"I2":{"order":[0,1],"green":[10,60],"offset":0}}',
         "10..60"),
        ('{"I1":{"order":[0,1,2],"green":[20,15,30],"offset":-1},"I2":{"order":[0,1],"green":[10,60],"offset":0}}',
         "offset"),
    ]:
        with pytest.raises(AnswerError, match=why):
            fmt.parse(bad)
    step = AnswerFormat("step", ("I1", "I2"), (3, 2), TIMING)
    assert step.parse("[2,1]") == {"I1": 2, "I2": 1}
    for bad in ("[3,1]", "[true,1]", '["2",1]', "[1]", '{"I1":2,"I2":1}'):
        with pytest.raises(AnswerError):
            step.parse(bad)


def test_grammar_and_schema_are_built_from_the_phase_table():
    fmt = AnswerFormat("plan", ("I1",), (3,), TIMING)
    grammar = fmt.gbnf()
    assert '"[2,0,1]"' in grammar and '"[0,0,1]"' not in grammar  # orders are permutations
    assert '"10" | "11"' in grammar and '"61"' not in grammar  # greens within min..max green
    assert len(AnswerFormat.orders(3)) == 6 and len(AnswerFormat.orders(6)) == 6  # rotations above 4 phases
    schema = fmt.json_schema()
    assert schema["properties"]["I1"]["properties"]["green"]["items"]["maximum"] == 60
    assert '"I1":{"order":[<each phase once>]' in fmt.example()
    step = AnswerFormat("step", ("I1", "I2"), (4, 2), TIMING)
    assert step.gbnf().startswith('root ::= "[" v0 "," v1 "]"') and 'v1 ::= "0" | "1"\n' in step.gbnf()
    assert step.json_schema()["prefixItems"][0]["enum"] == [0, 1, 2, 3]


def test_plan_execution_follows_order_greens_changes_and_offset():
    plan = TimingPlan((1, 0), (20, 30), 0)  # cycle = 20 + 30 + 2 * 5 = 60 s
    assert plan.cycle(TIMING) == 60
    assert [plan.phase_at(t, TIMING) for t in (0, 19, 21, 26, 54, 56, 60)] == [1, 1, 0, 0, 0, 1, 1]
    shifted = TimingPlan((1, 0), (20, 30), 25)
    assert shifted.phase_at(25, TIMING) == 1 and shifted.phase_at(24, TIMING) == 1  # 24 s is -1 mod 60
    assert shifted.phase_at(50, TIMING) == 0


# -- subsets --------------------------------------------------------------------------------------
class _Light:
    def __init__(self, tls_id: str, lanes: int) -> None:
        self.tls_id = tls_id
        self.in_lanes = tuple(f"{tls_id}_in{k}" for k in range(lanes))


def _chain_graph(names: list[str], gaps: list[float]) -> RoadGraph:
    """Lights on one road: a - b - c - ... with the given distances, both directions."""
    distance, feeds = {}, {}
    for (a, b), metres in zip(itertools.pairwise(names), gaps, strict=True):
        distance[(a, b)] = distance[(b, a)] = metres
        feeds[(a, b)] = frozenset({f"{b}_in0"})
        feeds[(b, a)] = frozenset({f"{a}_in1"})
    return RoadGraph(tuple(names), distance, {n: (0.0, 0.0) for n in names}, feeds)


def test_partition_grows_from_the_busiest_light_to_its_nearest_neighbours():
    lights = [_Light("a", 4), _Light("b", 4), _Light("c", 8), _Light("d", 4), _Light("e", 4)]
    graph = _chain_graph(["a", "b", "c", "d", "e"], [100, 300, 150, 50])
    subsets = partition(lights, graph, max_size=2)
    # c has the most lanes, d is its nearest neighbour; then b (more neighbours than a and e) takes a
    assert [s.lights for s in subsets] == [("c", "d"), ("b", "a"), ("e",)]
    assert subsets == partition(lights, graph, max_size=2)  # deterministic
    assert all(len(s.lights) <= 2 for s in subsets)
    assert sorted(t for s in subsets for t in s.lights) == ["a", "b", "c", "d", "e"]
    whole = partition(lights, graph, max_size=5)
    assert len(whole) == 1 and whole[0].lights[0] == "c"
    # inside {c, d}: d's lane 1 is fed by c, c's lane 0 by d... only lanes fed from outside remain
    inside = boundary_lanes(subsets[0], lights, graph)
    assert "d_in0" not in inside and "c_in1" not in inside and "c_in0" in inside
    with pytest.raises(RELEDError):
        partition(lights, graph, max_size=0)


# -- store ----------------------------------------------------------------------------------------
def _columns(rows: int) -> dict[str, np.ndarray]:
    cols = {name: np.zeros(rows, dtype=dtype) for name, dtype in COLUMNS.items()}
    cols["obs"] = np.random.default_rng(0).random((rows, feature_size()), dtype=np.float32)
    cols["mask"] = np.ones((rows, MAX_PHASES), dtype=bool)
    return cols


def test_store_round_trip_and_refusals(tmp_path: Path):
    folder = tmp_path / "demos"
    write_demos(folder, {"scenario": "grid2x2", "agents": ["A0", "B0"]}, _columns(12), overwrite=False)
    demos = load_demos(folder, scenario="grid2x2", agents=["A0", "B0"])
    assert len(demos) == 12 and demos.columns["obs"].shape == (12, feature_size())
    assert demos.manifest["rows"] == 12
    with pytest.raises(RELEDError, match="scenario grid2x2, not cologne8"):
        load_demos(folder, scenario="cologne8")
    with pytest.raises(RELEDError, match="lights"):
        load_demos(folder, agents=["A0"])
    with pytest.raises(RELEDError, match="exists"):
        write_demos(folder, {"scenario": "grid2x2"}, _columns(3), overwrite=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["feature_size"] = 7
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RELEDError, match="regenerate"):
        load_demos(folder)
    with pytest.raises(RELEDError, match="not a demonstration folder"):
        load_demos(tmp_path)


def test_a_failed_write_leaves_no_store_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "demos"
    write_demos(folder, {"scenario": "old"}, _columns(4), overwrite=False)

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(RELEDError, match="No space left on device; nothing was written"):
        write_demos(folder, {"scenario": "new"}, _columns(4), overwrite=True)
    assert load_demos(folder).manifest["scenario"] == "old"  # the previous store is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos"]  # no temp folder left


# -- model files and servers ---------------------------------------------------------------------
def test_model_paths_are_checked(tmp_path: Path):
    with pytest.raises(RELEDError, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(RELEDError, match="not a GGUF model"):
        resolve_model(str(fake))


def test_a_server_that_is_down_is_a_clear_error():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RELEDError, match="not answering"):
        HttpBackend(f"http://127.0.0.1:{port}", "default", timeout=2)
