"""Safety shield properties over random proposal sequences (hypothesis)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.shield import SafetyShield, SignalState, SignalTiming, Stage

timings = st.builds(
    SignalTiming,
    yellow=st.sampled_from([3.0, 4.0, 6.0]),
    all_red=st.sampled_from([0.0, 1.0, 2.0]),
    min_green=st.sampled_from([5.0, 10.0, 15.0]),
    max_green=st.sampled_from([20.0, 45.0, 60.0]),
)
# (seconds until the next proposal, proposed phase; may be out of range)
proposals = st.lists(st.tuples(st.sampled_from([1.0, 2.5, 5.0, 10.0, 30.0]), st.integers(-1, 8)),
                     min_size=1, max_size=120)


def drive(n_phases: int, timing: SignalTiming, seq: list[tuple[float, int]]) -> list[SignalState]:
    """Run the shield like the environment does: advance to every event, propose at decisions."""
    shield = SafetyShield(n_phases, timing)
    history = [shield.state]
    now = 0.0
    for wait, phase in seq:
        target = now + wait
        while shield.next_event() <= target:
            history += shield.advance(shield.next_event())
        now = target
        history += shield.advance(now)
        history += shield.propose(phase, now)
    end = now + 2 * timing.max_green
    while shield.next_event() <= end:
        history += shield.advance(shield.next_event())
    return history


@settings(max_examples=300, deadline=None)
@given(n_phases=st.integers(2, 8), timing=timings, seq=proposals)
def test_changes_always_pass_yellow_then_all_red(n_phases, timing, seq):
    history = drive(n_phases, timing, seq)
    for prev, cur in itertools.pairwise(history):
        if cur.stage is Stage.GREEN and prev.stage is Stage.GREEN:
            raise AssertionError(f"green {prev.phase} -> green {cur.phase} without a transition")
        if cur.stage is Stage.YELLOW:
            assert prev.stage is Stage.GREEN and cur.phase == prev.phase and cur.target != cur.phase
        if cur.stage is Stage.ALL_RED:
            assert prev.stage is Stage.YELLOW and cur.since - prev.since == timing.yellow
        if cur.stage is Stage.GREEN:
            expected = Stage.ALL_RED if timing.all_red > 0 else Stage.YELLOW
            assert prev.stage is expected and cur.phase == prev.target
            assert cur.since - prev.since == (timing.all_red if timing.all_red > 0 else timing.yellow)


@settings(max_examples=300, deadline=None)
@given(n_phases=st.integers(2, 8), timing=timings, seq=proposals)
def test_green_lasts_between_min_and_max(n_phases, timing, seq):
    history = drive(n_phases, timing, seq)
    for prev, cur in itertools.pairwise(history):
        if prev.stage is Stage.GREEN:
            green = cur.since - prev.since
            assert timing.min_green <= green <= timing.max_green, (prev, cur)


@settings(max_examples=200, deadline=None)
@given(n_phases=st.integers(2, 8), timing=timings, seq=proposals)
def test_only_valid_phases_are_ever_green(n_phases, timing, seq):
    assert all(0 <= s.phase < n_phases and 0 <= s.target < n_phases for s in drive(n_phases, timing, seq))


def test_request_is_served_as_soon_as_min_green_allows():
    shield = SafetyShield(4, SignalTiming(yellow=3, all_red=2, min_green=10, max_green=60))
    shield.propose(2, now=4.0)
    assert shield.next_event() == 10.0
    entered = shield.advance(15.0)
    assert [(s.stage, s.since) for s in entered] == [(Stage.YELLOW, 10.0), (Stage.ALL_RED, 13.0),
                                                     (Stage.GREEN, 15.0)]
    assert shield.state.phase == 2


def test_max_green_forces_the_next_phase_in_cycle():
    shield = SafetyShield(3, SignalTiming(max_green=20))
    shield.propose(0, now=0.0)
    entered = shield.advance(20.0)
    assert entered[0] == SignalState(Stage.YELLOW, 0, 1, 20.0)


def test_out_of_range_proposals_are_counted_not_obeyed():
    shield = SafetyShield(2)
    shield.propose(7, now=30.0)
    shield.propose(-1, now=30.0)
    assert shield.rejected_proposals == 2 and shield.state.stage is Stage.GREEN


@pytest.mark.parametrize("kwargs", [dict(yellow=0), dict(all_red=-1), dict(min_green=30, max_green=20)])
def test_bad_timings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SignalTiming(**kwargs)


def test_a_single_phase_light_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        SafetyShield(1)
