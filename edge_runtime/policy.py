"""The exported policy as the controller runs it: an ONNX Runtime session plus the metadata it carries.

The export writes everything a controller must check into the model's metadata: the observation
schema it was trained on, the phase tables of the intersections it knows, a monotone policy version
and a self-test (observations with the logits and actions the exporter got). A controller loads a
model only through :class:`OnnxPolicy`, which refuses a model built for another schema and can
replay the self-test before the model ever drives a signal.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import RELEDError
from edge_runtime.features import MAX_PHASES, SCHEMA_VERSION, feature_size

log = logging.getLogger(__name__)

META_PREFIX = "reled."
INPUTS = ("obs", "mask")
OUTPUTS = ("logits", "action")
MASKED_LOGIT = -1e9


@dataclass(frozen=True)
class SelfTest:
    """Observations with the logits and actions the exporter measured; replayed on the device."""

    obs: list[list[float]]
    mask: list[list[bool]]
    logits: list[list[float]]
    actions: list[int]
    tolerance: float  # largest logit difference accepted (int8 kernels differ slightly across CPUs)


@dataclass(frozen=True)
class PolicyTiming:
    """The signal timing a policy was trained with: its controllers must time their signals the same way
    (the defaults are RELED's default timing, which models exported before the export recorded it mean)."""

    yellow: float = 3.0
    all_red: float = 2.0
    min_green: float = 10.0
    max_green: float = 60.0
    decision_seconds: float = 10.0

    @classmethod
    def from_json(cls, text: str) -> PolicyTiming:
        """Every field from a JSON object; keys a later export may add are ignored (a device must still load it)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("timing: expected a JSON object")
        values = {name: data[name] for name in cls.__dataclass_fields__}  # KeyError names a missing field
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            raise TypeError(f"timing: expected numbers, got {values}")
        return cls(**{k: float(v) for k, v in values.items()})


@dataclass(frozen=True)
class PolicyMetadata:
    schema_version: int
    feature_size: int
    max_phases: int
    policy_version: int
    precision: str  # fp32 or int8
    scenario: str
    phase_tables: dict[str, list[str]]  # light id -> its green phases as SUMO state strings
    selftest: SelfTest
    timing: PolicyTiming = PolicyTiming()  # optional in the file: absent means RELED's default timing

    def to_props(self) -> dict[str, str]:
        """ONNX metadata_props (string values only)."""
        props = {k: v for k, v in asdict(self).items() if k not in ("phase_tables", "selftest", "timing")}
        props = {k: str(v) for k, v in props.items()}
        props["timing"] = json.dumps(asdict(self.timing), separators=(",", ":"))
        props["phase_tables"] = json.dumps(self.phase_tables, separators=(",", ":"))
        props["selftest"] = json.dumps(asdict(self.selftest), separators=(",", ":"))
        return {META_PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> PolicyMetadata:
        values = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
        try:
            meta = cls(schema_version=int(values["schema_version"]), feature_size=int(values["feature_size"]),
                       max_phases=int(values["max_phases"]), policy_version=int(values["policy_version"]),
                       precision=values["precision"], scenario=values["scenario"],
                       phase_tables=json.loads(values["phase_tables"]),
                       selftest=SelfTest(**json.loads(values["selftest"])),
                       timing=PolicyTiming.from_json(values["timing"]) if "timing" in values else PolicyTiming())
        except (KeyError, ValueError, TypeError) as exc:
            raise RELEDError(f"{source} is not a RELED policy (its metadata lacks or garbles {exc}): "
                             "export it with `reled export`") from exc
        if (meta.schema_version, meta.feature_size, meta.max_phases) != (SCHEMA_VERSION, feature_size(),
                                                                         MAX_PHASES):
            raise RELEDError(f"{source} was exported for observation schema v{meta.schema_version} "
                             f"({meta.feature_size} features, {meta.max_phases} phases); this controller builds "
                             f"v{SCHEMA_VERSION} ({feature_size()} features, {MAX_PHASES} phases): re-export it")
        return meta


@dataclass(frozen=True)
class Decision:
    action: int
    log_prob: float
    seconds: float  # inference wall time


def masked_log_softmax(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Log-probabilities over the real phases (padding gets -inf)."""
    z = np.where(mask, logits.astype(np.float64), -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def open_session(path: Path, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An ONNX Runtime session with a controller's settings: ``threads`` intra-op threads, no inter-op
    parallelism, the first available of ``providers`` (CPU when none is)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    if len(chosen) < len(providers):
        log.info("providers %s not available here; using %s", [p for p in providers if p not in available], chosen)
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise RELEDError(f"{path} could not be loaded by ONNX Runtime: {str(exc).splitlines()[0]}") from exc


class OnnxPolicy:
    """One ONNX Runtime session on a RELED policy file, with its metadata checked."""

    def __init__(self, path: Path, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.path = path
        self.session = open_session(path, threads, providers)
        try:
            props = self.session.get_modelmeta().custom_metadata_map
        except UnicodeDecodeError as exc:  # ORT hands metadata over as UTF-8 text; a hostile file need not be
            raise RELEDError(f"{path} is not a RELED policy: its metadata is not UTF-8 text") from exc
        self.meta = PolicyMetadata.from_props(props, str(path))
        names_in = tuple(i.name for i in self.session.get_inputs())
        names_out = tuple(o.name for o in self.session.get_outputs())
        if names_in != INPUTS or names_out != OUTPUTS:
            raise RELEDError(f"{path} has inputs {names_in} and outputs {names_out}; a RELED policy has "
                             f"{INPUTS} -> {OUTPUTS}")

    def run(self, obs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Batched: obs [B, F] float32, mask [B, P] bool → logits [B, P], actions [B]."""
        logits, actions = self.session.run(None, {"obs": obs.astype(np.float32, copy=False),
                                                  "mask": mask.astype(bool, copy=False)})
        return logits, actions

    def decide(self, obs: np.ndarray, mask: np.ndarray) -> Decision:
        start = time.perf_counter()
        logits, actions = self.run(obs[None, :], mask[None, :])
        seconds = time.perf_counter() - start
        action = int(actions[0])
        if not np.isfinite(logits[0][mask]).all():
            raise RELEDError("policy produced non-finite logits")
        if not (0 <= action < mask.shape[0] and mask[action]):
            raise RELEDError(f"policy chose phase {action}, which the mask forbids")
        return Decision(action, float(masked_log_softmax(logits[0], mask)[action]), seconds)

    def self_test(self) -> str | None:
        """Replay the exporter's self-test; None when it passes, else what went wrong."""
        test = self.meta.selftest
        obs = np.asarray(test.obs, dtype=np.float32)
        mask = np.asarray(test.mask, dtype=bool)
        try:
            logits, actions = self.run(obs, mask)
        except Exception as exc:  # a model that crashes its runtime fails the test, it does not crash us
            return f"inference failed: {str(exc).splitlines()[0]}"
        expected = np.asarray(test.logits, dtype=np.float32)
        real = mask
        if not np.isfinite(logits[real]).all():
            return "non-finite logits"
        error = float(np.abs(logits[real] - expected[real]).max())
        if error > test.tolerance:
            return f"logits differ from the exporter's by {error:.3g} (> {test.tolerance:g})"
        top2 = np.sort(np.where(real, expected, -np.inf), axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * test.tolerance
        wrong = int((actions[decisive] != np.asarray(test.actions)[decisive]).sum())
        if wrong:
            return f"{wrong} self-test actions differ from the exporter's"
        return None
