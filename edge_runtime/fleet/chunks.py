"""Answering chunk requests: only a deploy's targets, each chunk once per device per window, rate-limited.

Chunks go out on a shared topic that every downloading device hears, so one request makes the broker fan
out up to 64 KiB per chunk: unchecked, a device that is not even a target could make the server
broadcast megabytes for a few bytes of requests. A device that asks again within :data:`REPEAT_WINDOW`
was already answered (its own re-request timeout, ``chunk_timeout``, is at least 1 s); the token bucket
lets a device fetch a whole ``max_model_bytes`` model at once and then caps it at :data:`RATE`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edge_runtime.protocol import chunk_topic

log = logging.getLogger(__name__)

REPEAT_WINDOW = 0.5  # seconds: shorter than any device's chunk_timeout (3 s by default, 1 s in the tests)
RATE = 2 * 1024 * 1024  # bytes per second per device, sustained
BURST = 8 * 1024 * 1024  # bytes per device at once: a whole model of the default max_model_bytes
PER_REQUEST = 64  # chunks answered per request message


@dataclass
class TokenBucket:
    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, amount: float, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass(frozen=True)
class Served:
    data: bytes
    chunk_size: int
    targets: frozenset[str]


class ChunkServer:
    """The models one deploy process serves; ``publish(topic, payload)`` sends a chunk."""

    def __init__(self, publish: Callable[[str, bytes], Any], clock: Callable[[], float] = time.monotonic):
        self.publish = publish
        self.clock = clock
        self.models: dict[str, Served] = {}
        self.sent: dict[tuple[str, str], dict[int, float]] = {}  # (device, sha256) -> chunk -> when
        self.buckets: dict[str, TokenBucket] = {}
        self.warned: set[str] = set()  # devices refused as non-targets (bounded by the broker's users)
        self.served = 0
        self.refused = 0  # chunks asked for and not sent (not a target, repeated, over the rate, out of range)

    def add(self, sha256: str, data: bytes, chunk_size: int, targets: Iterable[str]) -> None:
        self.models[sha256] = Served(data, chunk_size, frozenset(targets))

    def answer(self, device: str, sha256: str, chunks: list[int]) -> None:
        """A validated request from ``device``; another deploy process serves models this one does not know."""
        model = self.models.get(sha256)
        if model is None:
            return
        asked = chunks[:PER_REQUEST]
        if device not in model.targets:
            self.refused += len(asked)
            if device not in self.warned:  # once: a flood of requests must not flood the log
                self.warned.add(device)
                log.warning("%s asks for chunks of %s, which is not deployed to it: refused", device, sha256[:12])
            return
        now = self.clock()
        sent = self.sent.setdefault((device, sha256), {})
        bucket = self.buckets.setdefault(device, TokenBucket(RATE, BURST, BURST, now))
        for index in asked:
            data = model.data[index * model.chunk_size:(index + 1) * model.chunk_size]
            repeated = index in sent and now - sent[index] < REPEAT_WINDOW
            if not data or repeated or not bucket.take(len(data), now):
                self.refused += 1
                continue
            sent[index] = now
            self.publish(chunk_topic(sha256, index), data)
            self.served += 1
