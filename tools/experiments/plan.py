"""What the paper's experiments run: one ``Run`` per training run, grouped by experiment (a)-(e).

Two profiles: ``full`` (the figures of docs/results/reled.md) and ``quick`` (CI's smoke test: two
tiny scenarios, short runs, one seed, minutes). Every run (``trainer.sweep.runs.Run``) is named by its
settings, so a run that exists and finished is skipped and one that stopped is resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.sweep.runs import Run

ALGOS = ("ippo", "mappo", "reled")
DEMANDS = ("moderate", "congested")
SEEDS = (0, 1, 2)
RESCO_TIMING = "configs/resco_timing.toml"
# RELED's ablations (experiment e): the flags of `reled train --algo reled` that switch one part off.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "no-gate": ("--no-gate",),
    "no-dtw": ("--no-dtw",),
    "no-sed": ("--no-sed",),
    "fixed-0.5": ("--expert-weight", "fixed:0.5"),
    "none": ("--expert-weight", "none"),
    "no-llm": ("--no-sed-llm",),  # demonstrations and SED passes from the classical tools only
    "no-pass": ("--sed-every", "0"),  # the round-0 demonstrations (chosen with the bound) kept: no SED pass
}


@dataclass(frozen=True)
class Profile:
    name: str
    runs: list[Run]
    zero_shot: list[tuple[str, str, str, str]]  # (train scenario, train demand, eval scenario, eval demand)
    heuristics_episodes: int  # SUMO seeds of the reference lines
    sed_every: int  # RELED's SED passes during training
    eval_every: int = 2  # updates between greedy evaluations: 25 in a 50-update run, for the last-20 variance
    eval_episodes: int = 1


def full() -> Profile:
    """The experiments of docs/results/reled.md, most informative first (the runner goes in this order)."""
    steps = 288_000
    runs: list[Run] = []
    for scenario in ("cologne8", "orlando", "hong_kong"):
        for demand in DEMANDS:
            runs += [Run("a", scenario, demand, algo, seed, steps) for seed in SEEDS for algo in ALGOS]
    runs += [Run("e", "cologne8", "moderate", "reled", seed, steps, variant=name, flags=flags)
             for name, flags in ABLATIONS.items() for seed in SEEDS]
    # the in-training SED pass, isolated where the delay rose most after it (cologne8 moderate's finding)
    runs += [Run("e", scenario, "congested", "reled", seed, steps, variant="no-pass", flags=ABLATIONS["no-pass"])
             for scenario in ("cologne8", "orlando") for seed in SEEDS]
    runs += [Run("resco", net, "moderate", algo, seed, 576_000, timing=RESCO_TIMING)
             for net in ("cologne8", "ingolstadt7") for seed in SEEDS for algo in ("ippo", "reled")]
    runs += [Run("c", net, "moderate", algo, 0, steps) for net in
             ("cologne1", "cologne3", "grid4x4", "grid6x6") for algo in ("ippo", "reled")]
    zero_shot = [(s, "moderate", s, "congested") for s in ("cologne8", "orlando", "hong_kong")]
    zero_shot += [("cologne8", "moderate", "orlando", "moderate"), ("orlando", "moderate", "cologne8", "moderate"),
                  ("cologne8", "moderate", "hong_kong", "moderate"), ("hong_kong", "moderate", "orlando", "moderate")]
    return Profile("full", runs, zero_shot, heuristics_episodes=10, sed_every=25)


def quick() -> Profile:
    """Minutes on 2 cores: every experiment type once, on tiny scenarios, to prove the pipeline end to end."""
    steps = 2_880
    tools_only = ABLATIONS["no-llm"]  # CI has no time for the LLM's demonstrations; the SED tests cover it
    runs = [Run("a", "grid2x2", "moderate", algo, 0, steps, flags=tools_only if algo == "reled" else ())
            for algo in ALGOS]
    runs += [Run("e", "grid2x2", "moderate", "reled", 0, steps, variant="no-gate",
                 flags=(*ABLATIONS["no-gate"], *tools_only))]
    runs += [Run("c", "cologne1", "moderate", algo, 0, steps, flags=tools_only if algo == "reled" else ())
             for algo in ("ippo", "reled")]
    zero_shot = [("grid2x2", "moderate", "grid2x2", "congested"), ("grid2x2", "moderate", "cologne1", "moderate")]
    return Profile("quick", runs, zero_shot, heuristics_episodes=1, sed_every=1)


PROFILES = {"full": full, "quick": quick}
