"""`reled-edge collect`: receive rollout batches, write each exactly once, acknowledge it.

A batch is written (temp file, then rename) before it is acknowledged, and a batch whose file already
exists is acknowledged again without being written, so a device that resends after a lost ack or a
restart never produces a duplicate. Files land as ``DIR/<device>/<epoch>/<seq>.npz`` for the trainer
(:func:`edge_runtime.rollouts.read_rollouts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.fileio import atomic_path
from edge_runtime.fleet.server import ServerLink
from edge_runtime.mqtt import Message
from edge_runtime.protocol import ProtocolError, device_of, device_topic, encode
from edge_runtime.rollouts import batch_path, unpack

log = logging.getLogger(__name__)

ROLLOUT_TOPIC = "reled/v1/dev/+/rollouts"


@dataclass
class CollectorStats:
    batches: int = 0
    rows: int = 0
    duplicates: int = 0
    refused: int = 0


class Collector:
    def __init__(self, server: ServerLink, out: Path):
        self.server = server
        self.out = out
        self.stats = CollectorStats()
        self.per_device: dict[str, int] = {}

    def handle(self, message: Message) -> None:
        if not message.topic.endswith("/rollouts"):
            return
        try:
            device = device_of(message.topic)
            batch = unpack(message.payload)
        except ProtocolError as exc:
            self.stats.refused += 1
            log.warning("refused a rollout batch on %s: %s", message.topic, exc)
            return
        if batch.device != device:
            self.stats.refused += 1
            log.warning("batch on %s claims device %s: refused", message.topic, batch.device)
            return
        path = batch_path(self.out, device, batch.epoch, batch.seq)
        if path.exists():
            self.stats.duplicates += 1
        else:
            with atomic_path(path) as tmp, tmp.open("wb") as fh:
                np.savez(fh, **batch.columns)
            self.stats.batches += 1
            self.stats.rows += batch.rows
            self.per_device[device] = self.per_device.get(device, 0) + batch.rows
        self.server.link.publish(device_topic(device, "rollouts/ack"), encode({"epoch": batch.epoch,
                                                                                "seq": batch.seq}))

    def pump(self, wait: float = 0.1) -> None:
        self.server.pump(wait, on_message=self.handle)
