"""The server's side of the fleet protocol: a signing, chunk-serving MQTT connection.

Used by `reled-edge deploy`, `status`, `rollback` and `collect`. Commands carry a ``seq`` that grows
across every command this key folder ever signed (max of the last one + 1 and the clock in ms), so a
device can refuse a replayed command without the server keeping per-device history.
"""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import RELEDError
from edge_runtime.features import SCHEMA_VERSION
from edge_runtime.fileio import atomic_write_text, sha256_bytes
from edge_runtime.fleet.broker import BrokerInfo
from edge_runtime.keys import KeyFolder
from edge_runtime.mqtt import BrokerAddress, Link, Message
from edge_runtime.policy import OnnxPolicy
from edge_runtime.protocol import (
    CHUNK_LIMIT,
    SERVER_USER,
    Manifest,
    ProtocolError,
    chunk_topic,
    decode_json,
    device_of,
    device_topic,
    sign,
)

SEQ_FILE = "server_seq.json"


def server_address(keys: KeyFolder, broker_dir: Path, host: str | None, port: int | None) -> BrokerAddress:
    """Where and how the server connects: --host/--port, else what `broker start` recorded."""
    info = BrokerInfo(host=host, port=port) if host and port else BrokerInfo.read(broker_dir)
    ca = info.ca_file if info.tls_port is not None else None
    return BrokerAddress(host or info.host, port or (info.tls_port if ca else info.port), SERVER_USER,
                         keys.password(SERVER_USER), ca)


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
        return Manifest(sha256=self.sha256, size=len(self.data), chunk_size=chunk_size, chunks=chunks,
                        schema_version=SCHEMA_VERSION, intersection=intersection,
                        phase_table=tuple(self.phase_tables[intersection]), policy_version=self.policy_version,
                        precision=self.precision, expires=time.time() + expires_in)


class ServerLink:
    """The server's MQTT connection: signs commands, serves chunks, tracks what devices report."""

    def __init__(self, keys: KeyFolder, address: BrokerAddress, name: str, extra_subscriptions: list[str] = ()):
        self.keys = keys
        self.models: dict[str, bytes] = {}
        self.chunk_sizes: dict[str, int] = {}
        self.reported: dict[str, dict[str, Any]] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.desired: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.retained_commands: dict[str, bytes] = {}
        self.chunks_served = 0
        subscriptions = ["reled/v1/dev/+/reported", "reled/v1/dev/+/status", "reled/v1/dev/+/events",
                         "reled/v1/dev/+/req/chunk", "reled/v1/dev/+/desired", *extra_subscriptions]
        self.link = Link(address, f"reled-server-{name}-{time.time_ns() % 10**9}", subscriptions,
                         on_connect=self._on_connect)

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

    def serve(self, model: Model, chunk_size: int) -> None:
        self.models[model.sha256] = model.data
        self.chunk_sizes[model.sha256] = chunk_size

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
        parts = message.topic.split("/")
        try:
            device = device_of(message.topic)
        except ProtocolError:
            return
        leaf = "/".join(parts[4:])
        if leaf == "desired":
            self._store_desired(device, message.payload)
            return
        if not message.payload:
            return
        try:
            body = decode_json(message.payload) if leaf != "rollouts" else None
        except ProtocolError:
            return
        if leaf == "reported" and body is not None:
            self.reported[device] = body
        elif leaf == "status" and body is not None:
            self.status[device] = body
        elif leaf == "events" and body is not None:
            self.events.setdefault(device, []).append(body)
        elif leaf == "req/chunk" and body is not None:
            self._answer_chunks(body)

    def _store_desired(self, device: str, payload: bytes) -> None:
        try:
            self.desired[device] = json.loads(payload)["doc"] if payload else {}
        except (ValueError, KeyError, TypeError):
            self.desired[device] = {"kind": "unreadable"}

    def _answer_chunks(self, body: dict[str, Any]) -> None:
        sha = body.get("sha256")
        data = self.models.get(sha) if isinstance(sha, str) else None
        indices = body.get("chunks")
        if data is None or not isinstance(indices, list):
            return  # another deploy process serves that model
        size = self.chunk_sizes[sha]
        for index in indices[:64]:
            if isinstance(index, int) and 0 <= index * size < len(data):
                self.link.publish(chunk_topic(sha, index), data[index * size:(index + 1) * size])
                self.chunks_served += 1
