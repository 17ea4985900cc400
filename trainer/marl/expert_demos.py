"""The demonstrations a RELED run learns from: its own copy in the run folder, and SED passes that renew it.

The run keeps its kept set as ``demos-vN/`` (a demonstration store, docs/sed.md) and its checkpoint names
N, so `--resume` reads exactly the demonstrations the interrupted update used. A SED pass (every
``sed_every`` updates, between updates so that llama.cpp and the look-ahead workers have the cores the
idle rollout workers leave) re-scores every subset's kept demonstration against the current policy
(D_j, hence B_j, depend on θ), runs the verified expert again with the current policy as π_θ, and keeps,
per subset, the better of the two by G_j − λ·B_j. A changed set is written as ``demos-v(N+1)``
atomically; the old one is removed once a checkpoint names the new one.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES
from edge_runtime.fileio import atomic_folder
from trainer.marl.config import TrainConfig
from trainer.marl.networks import Actor
from trainer.sed.bounds import nonstationarity_bound, one_hot, policy_divergence, subset_score
from trainer.sed.refine import RefineConfig, agent_probabilities
from trainer.sed.store import COLUMNS, DemoSet, load_demos, write_demos

log = logging.getLogger(__name__)
PREFIX = "demos-v"
PASS_FOLDER = ".sed-pass"  # a pass's fresh demonstrations, before they are merged


def demos_folder(run: Path, version: int) -> Path:
    return run / f"{PREFIX}{version}"


def remove_other_versions(run: Path, version: int) -> None:
    """Drop demonstration sets no checkpoint names (an older one, or one a crash left half-adopted)."""
    for path in [*run.glob(f"{PREFIX}*"), run / PASS_FOLDER]:
        if path.is_dir() and path != demos_folder(run, version):
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class RunFacts:
    """What a demonstration store must match to teach this run."""

    scenario: str  # the resolved scenario name
    agents: list[str]
    demand: str
    reward: str
    timing: dict[str, float]
    episode_seconds: float
    n_phases: list[int]  # per light: a net rebuilt under the same name and light IDs can change them


def check_matches(demos: DemoSet, facts: RunFacts) -> None:
    """Refuse, in one line, demonstrations of another demand, reward, timing, episode length or phase count
    (scenario, lights and schema are checked when the store is loaded)."""
    m = demos.manifest
    for name, mine, theirs in (("demand", facts.demand, m.get("demand")), ("reward", facts.reward, m.get("reward")),
                               ("timing", facts.timing, m.get("timing")),
                               ("episode length (s)", facts.episode_seconds, m.get("episode_seconds")),
                               ("phases per light", facts.n_phases, m.get("n_phases"))):
        if mine != theirs:
            raise RELEDError(f"{demos.folder} was made with {name} {theirs}, this run uses {mine}: generate "
                             "demonstrations with the run's settings (or drop --demos to have the run make them)")


def open_demos(folder: Path, facts: RunFacts) -> DemoSet:
    demos = load_demos(folder, facts.scenario, facts.agents)
    check_matches(demos, facts)
    return demos


def check_given(folder: Path, config: TrainConfig, facts: RunFacts) -> DemoSet:
    """A --demos store that can teach this run; --no-sed also needs one chosen without the bound."""
    demos = open_demos(folder, facts)
    lam = demos.manifest.get("config", {}).get("lam")
    if not config.hpo.sed and lam != 0:
        raise RELEDError(f"--no-sed learns from demonstrations chosen without the bound, but {folder} was made with "
                         f"λ = {lam}: generate them with `reled demos generate --lambda 0` or drop --demos")
    return demos


def initial_demos(run: Path, config: TrainConfig, facts: RunFacts) -> float:
    """Put the run's first demonstrations in ``demos-v0``; returns what they cost (seconds of SED).

    A given store (``--demos``) is checked and copied, and its generation time (from its manifest) is
    charged to the run; otherwise SED's default (verified) mode generates one now, on the run's seed.
    """
    target = demos_folder(run, 0)
    if config.hpo.demos:
        source = Path(config.hpo.demos)
        demos = check_given(source, config, facts)
        with atomic_folder(target) as tmp:
            for name in [*COLUMNS, "manifest.json"]:
                shutil.copy2(source / (f"{name}.npy" if name in COLUMNS else name), tmp)
        return float(demos.manifest.get("wall_seconds") or 0.0)
    start = time.perf_counter()
    _generate(target, config, actor=None)
    return time.perf_counter() - start


def _refine_config(config: TrainConfig) -> RefineConfig:
    """SED's settings for the run: its seed; λ = 0 with --no-sed (the bound does not guide the choice)."""
    return RefineConfig(seed=config.seed, **({} if config.hpo.sed else {"lam": 0.0}))


def _generate(out: Path, config: TrainConfig, actor: Actor | None) -> dict[str, Any]:
    from trainer.sed.generate import GenerateRequest, generate
    from trainer.sed.llm import LLMSettings

    request = GenerateRequest(env=config.env, llm=LLMSettings(), refine=_refine_config(config), mode="verified",
                              no_llm=not config.hpo.sed_llm, baselines=actor is None)
    return generate(request, out, overwrite=True, actor=actor)


@dataclass(frozen=True)
class SubsetRescore:
    """One subset's kept demonstration against the current policy (a row of sed.csv)."""

    subset: int
    ret: float  # G_j
    epsilon: float  # ε_j
    divergence: float  # D_j under the current θ
    bound: float  # B_j
    score: float  # G_j − λ·B_j


def rescore(demos: DemoSet, actor: Actor, refine: RefineConfig) -> list[SubsetRescore]:
    """D_j, B_j and the score of every subset's kept demonstration under ``actor`` (G_j, ε_j as measured)."""
    cols = demos.columns
    subset = np.asarray(cols["subset"])
    out = []
    for kept in demos.manifest["kept"]:
        j = kept["subset"]
        rows = np.flatnonzero(subset == j)
        probs = agent_probabilities(actor, np.asarray(cols["obs"])[rows], np.asarray(cols["mask"])[rows])
        actions = np.asarray(cols["action"])[rows]
        div = policy_divergence(probs[actions >= 0], one_hot(actions[actions >= 0], MAX_PHASES))
        bound = nonstationarity_bound(kept["epsilon"], div, refine.gamma)
        out.append(SubsetRescore(j, kept["ret"], kept["epsilon"], div, bound,
                                 subset_score(kept["ret"], bound, refine.lam)))
    return out


@dataclass(frozen=True)
class PassResult:
    version: int  # the demonstrations now in force
    rows: list[dict[str, Any]]  # sed.csv: per subset, the kept and the fresh candidate
    replaced: list[int]  # subsets whose demonstration changed
    llm_calls: int  # the fresh episode's calls to the embedded model (0 with --no-sed-llm)
    llm_late: int  # of them, answers past the deadline (the cores SED shares, made visible)


def sed_pass(run: Path, version: int, config: TrainConfig, facts: RunFacts, actor: Actor, update: int) -> PassResult:
    """Re-score the kept set under ``actor``, refine with a fresh verified episode, adopt the better per subset."""
    refine = _refine_config(config)
    current = open_demos(demos_folder(run, version), facts)
    kept = rescore(current, actor, refine)
    fresh_folder = run / PASS_FOLDER
    llm = _generate(fresh_folder, config, actor)["llm_totals"]
    fresh = open_demos(fresh_folder, facts)
    candidates = rescore(fresh, actor, refine)
    replaced = [old.subset for old, new in zip(kept, candidates, strict=True) if new.score > old.score]
    rows = [{"update": update, "source": source, "adopted": int((s.subset in replaced) == (source == "fresh")),
             **asdict(s)} for source, scores in (("kept", kept), ("fresh", candidates)) for s in scores]
    if replaced:
        _write_merged(demos_folder(run, version + 1), current, fresh, replaced, update)
        version += 1
    shutil.rmtree(fresh_folder, ignore_errors=True)
    return PassResult(version, rows, replaced, llm["calls"], llm["late"])


def _write_merged(target: Path, current: DemoSet, fresh: DemoSet, replaced: list[int], update: int) -> None:
    """The kept set with the ``replaced`` subsets' rows (and scores) taken from ``fresh``."""
    sources = [(fresh if j in replaced else current) for j in range(len(current.manifest["kept"]))]
    rows = [np.flatnonzero(np.asarray(source.columns["subset"]) == j) for j, source in enumerate(sources)]
    columns = {name: np.concatenate([np.asarray(source.columns[name])[r] for source, r in zip(sources, rows,
                                                                                           strict=True)])
               for name in COLUMNS}
    manifest = {k: v for k, v in current.manifest.items() if k not in ("format", "schema_version", "feature_size",
                                                                        "max_phases", "rows", "columns")}
    manifest["kept"] = [(fresh if j in replaced else current).manifest["kept"][j] for j in range(len(sources))]
    manifest["passes"] = [*current.manifest.get("passes", []), {"update": update, "replaced": replaced}]
    manifest.pop("kept_replay", None)  # the merged set was not replayed together
    write_demos(target, manifest, columns, overwrite=True)
    log.info("SED pass at update %d: subsets %s take the fresh demonstrations", update, replaced)
