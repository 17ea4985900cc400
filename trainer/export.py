"""Actor → ONNX for the intersection controller, with parity and int8 agreement measured at export.

The exported graph takes obs [B, F] float32 and mask [B, P] bool and returns the masked logits and the
greedy action, so the controller needs nothing but ONNX Runtime. Parity is measured on held-out
observations from a fresh SUMO episode the policy drives itself (a seed no training run uses): the
logits must match torch within ``LOGIT_TOLERANCE`` and every action must be identical, or nothing is
written. The int8 model (dynamic quantization of the weights) is reported by its action agreement.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_size
from edge_runtime.fileio import atomic_path
from edge_runtime.policy import INPUTS, OUTPUTS, OnnxPolicy, PolicyMetadata, PolicyTiming, SelfTest, open_session
from trainer.marl.checkpoint import actor_from_checkpoint, check_scenario, load_checkpoint
from trainer.marl.networks import Actor

log = logging.getLogger(__name__)

HOLDOUT_SEED = 1_000_003  # far from the seeds training and evaluation use
LOGIT_TOLERANCE = 1e-4
SELFTEST_SIZE = 32
OPSET = 17


@dataclass(frozen=True)
class ExportRequest:
    out: Path
    run: Path | None = None  # a run folder or a checkpoint file
    scenario: str | None = None  # with no run: a freshly initialized actor for this scenario
    demand: str = "moderate"
    int8: bool = False
    policy_version: int | None = None  # None: the export time in seconds (monotone across exports)
    holdout_decisions: int = 60
    min_int8_agreement: float = 0.95
    seed: int = 0


@dataclass
class ExportReport:
    fp32: Path
    int8: Path | None
    policy_version: int
    scenario: str
    lights: int
    holdout: int
    max_logit_error: float
    action_agreement: float
    int8_agreement: float | None = None
    int8_max_logit_error: float | None = None
    fp32_bytes: int = 0
    int8_bytes: int | None = None


class _ActorWithAction(torch.nn.Module):
    """What the controller runs: masked logits and the greedy phase, in one graph."""

    def __init__(self, actor: Actor):
        super().__init__()
        self.actor = actor

    def forward(self, obs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.actor(obs, mask)
        return logits, logits.argmax(dim=-1)


@dataclass(frozen=True)
class ActorSource:
    """The actor to export and what it was trained on (``checkpoint`` is None for a fresh actor)."""

    actor: Actor
    scenario: str
    demand: str
    timing: dict[str, Any] | None
    checkpoint: dict[str, Any] | None = None
    path: Path | None = None


def load_actor(request: ExportRequest) -> ActorSource:
    if request.run is not None:
        path = request.run
        if path.is_dir():
            path = next((path / name for name in ("best.pt", "latest.pt") if (path / name).is_file()), path)
        data = load_checkpoint(path)
        return ActorSource(actor_from_checkpoint(data), data["scenario"], data["demand"],
                           data["config"].get("timing"), data, path)
    if request.scenario is None:
        raise RELEDError("give --run runs/NAME (a trained policy) or --scenario NAME (a freshly initialized one)")
    torch.manual_seed(request.seed)
    return ActorSource(Actor().eval(), request.scenario, request.demand, None)


def trained_timing(source: ActorSource) -> PolicyTiming:
    """The timing the actor was trained with (the run's, else its scenario's, as the env picks it): the device
    files of its controllers must use the same, so the export records it (``reled.timing``)."""
    from trainer.scenarios import DecisionTiming, get_scenario

    timing = DecisionTiming(**source.timing) if source.timing else get_scenario(source.scenario).timing
    return PolicyTiming(yellow=timing.yellow, all_red=timing.all_red, min_green=timing.min_green,
                        max_green=timing.max_green, decision_seconds=timing.delta)


def collect_holdout(actor: Actor, scenario: str, demand: str, decisions: int, timing: dict[str, Any] | None,
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]], list[str], list[int]]:
    """Observations of a fresh episode the actor drives greedily, and every light's green phases."""
    from trainer.env import EnvConfig, TrafficSignalEnv
    from trainer.marl.policy import PolicyController
    from trainer.rollout import play_episode
    from trainer.scenarios.model import DecisionTiming

    config = EnvConfig(scenario=scenario, demand=demand, collect_metrics=False,
                       timing=DecisionTiming(**timing) if timing else None)
    env = TrafficSignalEnv(config)
    try:
        agents = list(env.possible_agents)
        tables = {i.tls_id: list(i.green_states) for i in env.intersections}
        episode = play_episode(env, PolicyController(actor), HOLDOUT_SEED, max_decisions=decisions)
        return (episode.obs.reshape(-1, episode.obs.shape[-1]), episode.masks.reshape(-1, episode.masks.shape[-1]),
                tables, agents, [i.n_phases for i in env.intersections])
    finally:
        env.close()


def write_onnx(actor: Actor, obs: np.ndarray, mask: np.ndarray, path: Path) -> None:
    sample = (torch.from_numpy(obs[:2]), torch.from_numpy(mask[:2]))
    batch = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; dynamo needs onnxscript
        torch.onnx.export(_ActorWithAction(actor), sample, str(path), input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=dict.fromkeys([*INPUTS, *OUTPUTS], batch),
                          opset_version=OPSET, dynamo=False)


def set_metadata(path: Path, meta: PolicyMetadata) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta.to_props())
    onnx.save(model, str(path))


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing tip through the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def compare(policy: OnnxPolicy, obs: np.ndarray, mask: np.ndarray, ref_logits: np.ndarray,
            ref_actions: np.ndarray) -> tuple[float, float]:
    """Largest logit difference on real phases, and the fraction of identical actions."""
    logits, actions = policy.run(obs, mask)
    return float(np.abs(logits[mask] - ref_logits[mask]).max()), float((actions == ref_actions).mean())


def selftest_rows(n: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(SELFTEST_SIZE, n)).astype(int))


def export_policy(request: ExportRequest, progress: Callable[[str], None] = log.info) -> ExportReport:
    """Write ``request.out`` (and ``<stem>.int8.onnx``) or raise with the failed check; nothing half-written."""
    if request.out.suffix != ".onnx":
        raise RELEDError(f"--out {request.out} must end in .onnx")
    if request.out.is_dir():
        raise RELEDError(f"--out {request.out} is a folder: give a file name such as {request.out / 'policy.onnx'}")
    source = load_actor(request)
    actor, scenario = source.actor, source.scenario
    progress(f"collecting {request.holdout_decisions} held-out decisions on {scenario} ({source.demand})")
    obs, mask, tables, agents, n_phases = collect_holdout(actor, scenario, source.demand, request.holdout_decisions,
                                                          source.timing)
    if source.checkpoint is not None:
        check_scenario(source.checkpoint, source.path, scenario, agents, n_phases)
    with torch.no_grad():
        ref_logits = actor(torch.from_numpy(obs), torch.from_numpy(mask)).numpy()
    ref_actions = ref_logits.argmax(-1)
    version = request.policy_version if request.policy_version is not None else int(time.time())
    int8_out = request.out.with_name(request.out.stem + ".int8.onnx")
    rows = selftest_rows(len(obs))
    timing = trained_timing(source)

    def metadata(precision: str, logits: np.ndarray, actions: np.ndarray, tolerance: float) -> PolicyMetadata:
        return PolicyMetadata(schema_version=SCHEMA_VERSION, feature_size=feature_size(), max_phases=MAX_PHASES,
                              policy_version=version,
                              precision=precision, scenario=scenario, phase_tables=tables,
                              selftest=SelfTest(obs=obs[rows].tolist(), mask=mask[rows].tolist(),
                                                logits=logits[rows].tolist(), actions=actions[rows].tolist(),
                                                tolerance=tolerance),
                              timing=timing)

    with atomic_path(request.out) as fp32_tmp, _maybe(request.int8, int8_out) as int8_tmp:
        progress("exporting to ONNX")
        write_onnx(actor, obs, mask, fp32_tmp)
        set_metadata(fp32_tmp, metadata("fp32", ref_logits, ref_actions, 1e-3))
        fp32 = OnnxPolicy(fp32_tmp)
        error, agreement = compare(fp32, obs, mask, ref_logits, ref_actions)
        if error > LOGIT_TOLERANCE or agreement < 1.0:
            raise RELEDError(f"ONNX parity failed on {len(obs)} held-out observations: logits differ by up to "
                             f"{error:.3g} (tolerance {LOGIT_TOLERANCE:g}), {agreement:.1%} identical actions; "
                             "nothing was written")
        _check_selftest(fp32_tmp)
        report = ExportReport(fp32=request.out, int8=None, policy_version=version, scenario=scenario,
                              lights=len(tables), holdout=len(obs), max_logit_error=error, action_agreement=agreement,
                              fp32_bytes=fp32_tmp.stat().st_size)
        if int8_tmp is not None:
            progress("quantizing to int8")
            quantize_int8(fp32_tmp, int8_tmp)
            q_logits, q_actions = _raw_run(int8_tmp, obs, mask)
            q_error = float(np.abs(q_logits[mask] - ref_logits[mask]).max())
            q_agreement = float((q_actions == ref_actions).mean())
            if q_agreement < request.min_int8_agreement:
                raise RELEDError(f"int8 model agrees with fp32 on only {q_agreement:.1%} of {len(obs)} held-out "
                                 f"actions (< --min-int8-agreement {request.min_int8_agreement:.0%}); "
                                 "nothing was written: deploy the fp32 model")
            set_metadata(int8_tmp, metadata("int8", q_logits, q_actions, max(0.05, 2 * q_error)))
            _check_selftest(int8_tmp)
            report.int8, report.int8_agreement, report.int8_max_logit_error = int8_out, q_agreement, q_error
            report.int8_bytes = int8_tmp.stat().st_size
    return report


def _check_selftest(path: Path) -> None:
    problem = OnnxPolicy(path).self_test()
    if problem:
        raise RELEDError(f"the exported model fails its own self-test ({problem}); nothing was written")


def _raw_run(path: Path, obs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a model that has no RELED metadata yet (the fresh int8 file)."""
    logits, actions = open_session(path).run(None, {"obs": obs, "mask": mask})
    return logits, actions


@contextlib.contextmanager
def _maybe(enabled: bool, path: Path):
    if not enabled:
        yield None
        return
    with atomic_path(path) as tmp:
        yield tmp
