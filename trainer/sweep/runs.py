"""One training run of a plan, named by its settings so that a finished run is found again."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    experiment: str  # a, c, e, resco (b and d reuse the runs of a); "sweep" for `reled sweep`
    scenario: str
    demand: str
    algo: str
    seed: int
    steps: int
    timing: str | None = None  # a TOML with [timing] (RESCO's); None: the scenario's (RELED's default)
    variant: str = ""  # an ablation name (experiment e)
    flags: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        timing = "-resco" if self.timing else ""
        variant = f"-{self.variant}" if self.variant else ""
        return f"{self.algo}{variant}-{self.scenario}{timing}-{self.demand}-s{self.seed}"

    @property
    def demos_key(self) -> str:
        """The demonstration store a RELED run starts from (shared by its ablations)."""
        timing = "-resco" if self.timing else ""
        tools_only = "-no-llm" if self.tools_only else ""
        unbounded = "-lambda0" if self.unbounded else ""
        return f"{self.scenario}{timing}-{self.demand}-s{self.seed}{tools_only}{unbounded}"

    @property
    def unbounded(self) -> bool:
        """--no-sed: demonstrations chosen without the bound (λ = 0)."""
        return "--no-sed" in self.flags

    @property
    def tools_only(self) -> bool:
        """Whether SED runs without the LLM for this run."""
        return "--no-sed-llm" in self.flags
