"""The server's side of the fleet protocol: a signing, chunk-serving MQTT connection.

Used by `reled-edge deploy`, `status`, `rollback` and `collect`. Commands carry a ``seq`` that grows
across every command this key folder ever signed (max of the last one + 1 and the clock in ms), so a
device can refuse a replayed command without the server keeping per-device history.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from edge_runtime.credentials import PinnedKey, load_public_key
from edge_runtime.errors import RELEDError
from edge_runtime.features import SCHEMA_VERSION
from edge_runtime.fileio import atomic_write_text, sha256_bytes
from edge_runtime.fleet.broker import BrokerInfo
from edge_runtime.fleet.chunks import ChunkServer
from edge_runtime.keys import KeyFolder
from edge_runtime.mqtt import BrokerAddress, Link, Message
from edge_runtime.policy import OnnxPolicy
from edge_runtime.protocol import (
    CHUNK_LIMIT,
    DEVICE_ID,
    ROOT,
    SERVER_USER,
    Manifest,
    ProtocolError,
    decode_json,
    device_topic,
    sign,
    verify,
)
from edge_runtime.schema import CHUNK_REQUEST, COMMAND, EVENT, REPORTED, STATUS, Spec, validate

SEQ_FILE = "server_seq.json"
MAX_CHUNKS = 3000  # chunk hashes per manifest: the signed command stays well under JSON_LIMIT
EVENTS_KEPT = 100  # per device: a chatty or hostile device cannot grow a long-running collector
# what the server reads on each device topic (rollouts: the collector's, edge_runtime.rollouts.unpack)
SCHEMAS: dict[str, Spec] = {"reported": REPORTED, "status": STATUS, "events": EVENT, "req/chunk": CHUNK_REQUEST,
                            "desired": COMMAND}
log = logging.getLogger(__name__)


def server_address(keys: KeyFolder, broker_dir: Path, host: str | None, port: int | None) -> BrokerAddress:
    """Where and how the server connects: --host/--port (plain MQTT), else the server listener `broker start`
    recorded (TLS, verified against its CA, when the broker has a TLS port)."""
    info = BrokerInfo(host=host, port=None, server_port=port) if host and port else BrokerInfo.read(broker_dir)
    return BrokerAddress(host or info.host, port or info.server_port, SERVER_USER, keys.password(SERVER_USER),
                         info.ca_file)


def next_seq(keys: KeyFolder) -> int:
    path = keys.root / SEQ_FILE
    last = json.loads(path.read_text())["seq"] if path.exists() else 0
    seq = max(last + 1, int(time.time() * 1000))
    atomic_write_text(path, json.dumps({"seq": seq}) + "\n")
    return seq


@dataclass(frozen=True)
class Model:
    path: Path
    data: bytes
    sha256: str
    policy_version: int
    precision: str
    phase_tables: dict[str, list[str]]

    @classmethod
    def load(cls, path: Path) -> Model:
        policy = OnnxPolicy(path)  # refuses files that are not RELED policies for this schema
        data = path.read_bytes()
        meta = policy.meta
        return cls(path, data, sha256_bytes(data), meta.policy_version, meta.precision,
                   meta.phase_tables)

    def manifest(self, intersection: str, chunk_size: int, expires_in: float) -> Manifest:
        if not 1024 <= chunk_size <= CHUNK_LIMIT:
            raise RELEDError(f"--chunk-size {chunk_size} must be within 1024..{CHUNK_LIMIT} bytes")
        if intersection not in self.phase_tables:
            known = ", ".join(sorted(self.phase_tables)[:6])
            raise RELEDError(f"{self.path} was not exported for intersection {intersection!r} (it knows {known}...): "
                             "export a policy trained on that intersection's scenario")
        chunks = tuple(sha256_bytes(self.data[i:i + chunk_size])
                       for i in range(0, len(self.data), chunk_size))
        if len(chunks) > MAX_CHUNKS:  # each hash is ~67 bytes of the signed command, which devices bound
            raise RELEDError(f"--chunk-size {chunk_size} cuts {self.path.name} into {len(chunks)} chunks; a manifest "
                             f"lists at most {MAX_CHUNKS}: use a larger --chunk-size")
        return Manifest(sha256=self.sha256, size=len(self.data), chunk_size=chunk_size, chunks=chunks,
                        schema_version=SCHEMA_VERSION, intersection=intersection,
                        phase_table=tuple(self.phase_tables[intersection]), policy_version=self.policy_version,
                        precision=self.precision, expires=time.time() + expires_in)


class ServerLink:
    """The server's MQTT connection: signs commands, serves chunks, tracks what devices report."""

    def __init__(self, keys: KeyFolder, address: BrokerAddress, name: str, extra_subscriptions: list[str] = (),
                 will: tuple[str, bytes] | None = None):
        self.keys = keys
        # only validated documents (edge_runtime.schema); a device whose latest message on a topic was refused
        # is in ``invalid`` instead, until a valid one replaces it
        self.reported: dict[str, dict[str, Any]] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.desired: dict[str, dict[str, Any]] = {}
        self.events: dict[str, deque[dict[str, Any]]] = {}  # the newest EVENTS_KEPT per device
        self.refused: dict[str, dict[str, str]] = {}  # device -> topic leaf -> why its latest message was refused
        self.warned: set[tuple[str, str]] = set()  # (device, leaf) refusals logged as warnings already
        self.retained_commands: dict[str, bytes] = {}
        self.stores = {"reported": self.reported, "status": self.status, "desired": self.desired}
        self.chunks = ChunkServer(lambda topic, data: self.link.publish(topic, data))
        subscriptions = [f"{ROOT}/dev/+/{leaf}" for leaf in SCHEMAS] + list(extra_subscriptions)
        self.link = Link(address, f"reled-server-{name}-{time.time_ns() % 10**9}", subscriptions, will=will,
                         on_connect=self._on_connect)

    @property
    def invalid(self) -> dict[str, str]:
        """Devices whose latest message on some topic broke the schema, with the reasons."""
        return {device: "; ".join(f"{leaf}: {why}" for leaf, why in leaves.items())
                for device, leaves in self.refused.items() if leaves}

    @cached_property
    def public_key(self) -> PinnedKey:
        return load_public_key(self.keys.public_key_path)

    def _on_connect(self) -> None:
        for device, payload in self.retained_commands.items():  # a restarted broker may have lost them
            self.link.publish(device_topic(device, "desired"), payload, retain=True)

    def start(self) -> ServerLink:
        self.link.start()
        return self

    def close(self) -> None:
        self.link.close()

    def command(self, device: str, document: dict[str, Any]) -> int:
        """Sign and publish a retained command; returns its seq."""
        seq = next_seq(self.keys)
        payload = sign({**document, "device": device, "seq": seq, "issued": time.time()}, self.keys.signing_key())
        self.retained_commands[device] = payload
        self.link.publish(device_topic(device, "desired"), payload, retain=True).wait_for_publish(10)
        return seq

    def serve(self, model: Model, chunk_size: int, targets: Iterable[str]) -> None:
        """Answer chunk requests for ``model`` from ``targets`` (the devices it is deployed to) only."""
        self.chunks.add(model.sha256, model.data, chunk_size, targets)

    def pump(self, wait: float = 0.05, on_message: Any = None) -> None:
        """Handle what arrived (chunk requests are answered here); block up to ``wait`` for the first message."""
        try:
            message = self.link.inbox.get(timeout=wait)
        except queue.Empty:
            return
        while True:
            self._handle(message)
            if on_message is not None:
                on_message(message)
            try:
                message = self.link.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: Message) -> None:
        """Keep a device's message if it passes its schema; a refused one marks the device invalid instead."""
        parts = message.topic.split("/", 4)
        if len(parts) < 5 or parts[:3] != ["reled", "v1", "dev"] or parts[4] not in SCHEMAS \
                or not DEVICE_ID.match(parts[3]):
            return  # rollouts are the collector's; an id the broker would never have accepted is nobody's
        device, leaf = parts[3], parts[4]
        store = self.stores.get(leaf)
        if not message.payload:  # a retained message was cleared
            if store is not None:
                store.pop(device, None)
            self.refused.get(device, {}).pop(leaf, None)
            return
        try:
            body = self._validated(device, leaf, message.payload)
        except ProtocolError as exc:
            self._refuse(device, leaf, str(exc))
            if store is not None:
                store.pop(device, None)
            return
        self.refused.get(device, {}).pop(leaf, None)
        if store is not None:
            store[device] = body
        elif leaf == "events":
            self.events.setdefault(device, deque(maxlen=EVENTS_KEPT)).append(body)
        else:
            self.chunks.answer(device, body["sha256"], body["chunks"])

    def _validated(self, device: str, leaf: str, payload: bytes) -> dict[str, Any]:
        # a command read back must still be the server's: the device could have overwritten its own
        document = verify(payload, self.public_key) if leaf == "desired" else decode_json(payload)
        body = validate(document, SCHEMAS[leaf])
        if body.get("device", device) != device:
            raise ProtocolError("device: names another device")
        return body

    def _refuse(self, device: str, leaf: str, reason: str) -> None:
        level = logging.DEBUG if (device, leaf) in self.warned else logging.WARNING  # a flood logs once
        self.warned.add((device, leaf))
        log.log(level, "%s's message on %s refused: %s", device, leaf, reason)
        self.refused.setdefault(device, {})[leaf] = reason
