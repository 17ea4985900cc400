"""Rollout batches: what a controller records per decision, packed with msgpack + zstd.

A batch is identified by (device, epoch, seq): ``epoch`` is fixed when the controller's outbox is
created and ``seq`` grows with every batch, so a batch sent twice is recognised as the same batch.
The server's collector writes each batch once, as an ``.npz`` the trainer reads with NumPy alone.
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zstandard

from edge_runtime.features import MAX_PHASES, feature_size
from edge_runtime.protocol import DEVICE_ID, ROLLOUT_LIMIT, ProtocolError
from edge_runtime.schema import COUNTER, DEVICE, Bytes, Int, Obj, Str, validate

log = logging.getLogger(__name__)

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
ROW_BYTES = sum(np.dtype(d).itemsize * int(np.prod(s, dtype=int)) for d, s in COLUMNS.values())
# epoch and seq name the batch's folder and file (batch_path): 16 hex digits and a decimal, never negative
BATCH = Obj({"format": Str(32, choices=frozenset({FORMAT})), "device": DEVICE, "epoch": COUNTER, "seq": COUNTER,
             "rows": Int(1, MAX_ROWS),
             "columns": Obj({k: Bytes(MAX_ROWS * ROW_BYTES) for k in COLUMNS})})
EPOCH_DIR = re.compile(r"^[0-9a-f]{16}$")
BATCH_FILE = re.compile(r"^[0-9]{10,19}\.npz$")


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
    """Decode and validate a batch; ProtocolError on anything malformed or oversized, so that nothing the
    collector writes can later break :func:`read_rollouts` (a negative epoch, a column of the wrong length)."""
    if len(payload) > ROLLOUT_LIMIT:
        raise ProtocolError(f"rollout batch of {len(payload)} bytes exceeds {ROLLOUT_LIMIT}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_ROWS * ROW_BYTES + 4096)
        document = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (zstandard.ZstdError, msgpack.UnpackException, ValueError, TypeError) as exc:  # ValueError: nesting too
        raise ProtocolError(f"malformed rollout batch: {type(exc).__name__} {str(exc)[:200]}") from exc
    body = validate(document, BATCH)
    rows = body["rows"]
    columns = {}
    for name, (dtype, shape) in COLUMNS.items():
        data = body["columns"][name]
        expected = rows * np.dtype(dtype).itemsize * int(np.prod(shape, dtype=int))
        if len(data) != expected:
            raise ProtocolError(f"columns.{name}: {len(data)} bytes for {rows} rows (expected {expected})")
        columns[name] = np.frombuffer(data, dtype=dtype).reshape((rows, *shape))
    return Batch(body["device"], body["epoch"], body["seq"], columns)


def batch_path(root: Path, device: str, epoch: int, seq: int) -> Path:
    return root / device / f"{epoch:016x}" / f"{seq:010d}.npz"


def _load(path: Path, root: Path) -> dict[str, np.ndarray]:
    """One batch file's columns, or ProtocolError when it is not what :func:`batch_path` and the collector write."""
    device, epoch, name = path.relative_to(root).parts
    if not (DEVICE_ID.match(device) and EPOCH_DIR.match(epoch) and BATCH_FILE.match(name)):
        raise ProtocolError("not a <device>/<16 hex digit epoch>/<seq>.npz path")
    try:
        with np.load(path, allow_pickle=False) as data:
            columns = {k: data[k] for k in COLUMNS}
    except Exception as exc:  # whatever a damaged or foreign file raises (zip, zlib, npy, missing column errors)
        raise ProtocolError(f"unreadable ({type(exc).__name__}: {str(exc)[:200]})") from exc
    rows = len(columns["decision"])
    for name, (dtype, shape) in COLUMNS.items():
        if columns[name].dtype != np.dtype(dtype) or columns[name].shape != (rows, *shape):
            raise ProtocolError(f"column {name} is {columns[name].dtype}{list(columns[name].shape)}, "
                                f"expected {dtype}{[rows, *shape]}")
    columns["device"] = np.full(rows, device)
    columns["epoch"] = np.full(rows, int(epoch, 16), dtype=np.uint64)
    return columns


def read_rollouts(root: Path, device: str | None = None) -> dict[str, np.ndarray]:
    """Every collected row under ``root`` (one device or all), concatenated, with ``device`` and ``epoch`` columns.
    A file that is not a batch as the collector writes it is skipped with a warning, not fatal for every device."""
    parts: list[dict[str, np.ndarray]] = []
    skipped: list[str] = []
    for path in sorted(root.glob(f"{glob.escape(device) if device else '*'}/*/*.npz")):
        try:
            parts.append(_load(path, root))
        except ProtocolError as exc:
            skipped.append(f"{path.relative_to(root)}: {exc}")
    if skipped:
        log.warning("read_rollouts skipped %d file(s) under %s: %s", len(skipped), root, "; ".join(skipped[:5]))
    if not parts:
        return {k: np.zeros((0, *s), dtype=d) for k, (d, s) in COLUMNS.items()}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
