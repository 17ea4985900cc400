"""Rollout batches: what a controller records per decision, packed with msgpack + zstd.

A batch is identified by (device, epoch, seq): ``epoch`` is fixed when the controller's outbox is
created and ``seq`` grows with every batch, so a batch sent twice is recognised as the same batch.
The server's collector writes each batch once, as an ``.npz`` the trainer reads with NumPy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.protocol import ROLLOUT_LIMIT, ProtocolError

FORMAT = "reled-rollouts/1"
MAX_ROWS = 4096  # per batch; keeps a batch under ROLLOUT_LIMIT
SOURCE_POLICY, SOURCE_FALLBACK = 0, 1

# column -> (dtype, per-row shape)
COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "decision": ("int64", ()),  # the outbox's row id: unique and gap-free per epoch
    "time": ("float64", ()),  # signal clock, seconds
    "obs": ("float32", (feature_size(),)),
    "mask": ("bool", (MAX_PHASES,)),
    "action": ("int16", ()),  # the phase proposed
    "log_prob": ("float32", ()),
    "override": ("bool", ()),  # the shield did not head for the proposed phase
    "reward": ("float32", ()),  # minus the queued vehicles, from local detectors
    "source": ("int8", ()),  # 0 policy, 1 fixed-time fallback
    "policy_version": ("int64", ()),
}


@dataclass
class Batch:
    device: str
    epoch: int
    seq: int
    columns: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.columns["decision"])


def pack(batch: Batch) -> bytes:
    body = {"format": FORMAT, "device": batch.device, "epoch": batch.epoch, "seq": batch.seq, "rows": batch.rows,
            "columns": {k: np.ascontiguousarray(batch.columns[k], dtype=COLUMNS[k][0]).tobytes() for k in COLUMNS}}
    return zstandard.ZstdCompressor(level=3).compress(msgpack.packb(body, use_bin_type=True))


def unpack(payload: bytes) -> Batch:
    """Decode and validate a batch; ProtocolError on anything malformed or oversized."""
    if len(payload) > ROLLOUT_LIMIT:
        raise ProtocolError(f"rollout batch of {len(payload)} bytes exceeds {ROLLOUT_LIMIT}")
    row_bytes = sum(np.dtype(d).itemsize * int(np.prod(s, dtype=int)) for d, s in COLUMNS.values())
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_ROWS * row_bytes + 4096)
        body = msgpack.unpackb(raw, raw=False)
        rows = int(body["rows"])
        if body["format"] != FORMAT or not 0 < rows <= MAX_ROWS:
            raise ProtocolError(f"not a {FORMAT} batch or bad row count {rows}")
        columns = {}
        for name, (dtype, shape) in COLUMNS.items():
            columns[name] = np.frombuffer(body["columns"][name], dtype=dtype).reshape((rows, *shape))
        return Batch(str(body["device"]), int(body["epoch"]), int(body["seq"]), columns)
    except (zstandard.ZstdError, msgpack.UnpackException, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed rollout batch: {exc}") from exc


def batch_path(root: Path, device: str, epoch: int, seq: int) -> Path:
    return root / device / f"{epoch:016x}" / f"{seq:010d}.npz"


def read_rollouts(root: Path, device: str | None = None) -> dict[str, np.ndarray]:
    """Every collected row under ``root`` (one device or all), concatenated, with a ``device`` column."""
    parts: list[dict[str, np.ndarray]] = []
    for path in sorted(root.glob(f"{device or '*'}/*/*.npz")):
        with np.load(path) as data:
            columns = {k: data[k] for k in COLUMNS}
        columns["device"] = np.full(len(columns["decision"]), path.parent.parent.name)
        columns["epoch"] = np.full(len(columns["decision"]), int(path.parent.name, 16), dtype=np.uint64)
        parts.append(columns)
    if not parts:
        return {k: np.zeros((0, *s), dtype=d) for k, (d, s) in COLUMNS.items()}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
