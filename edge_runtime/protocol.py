"""The MQTT protocol between the server and the controllers: topics, payload limits, signed documents.

Every server→device command is a JSON document signed with the server's Ed25519 key and carrying a
monotone ``seq``; the device pins the public key, so neither the broker nor another device can
forge or replay a command. Payload sizes are bounded before anything is parsed.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ROOT = "reled/v1"
CHUNK_LIMIT = 64 * 1024  # bytes of model per chunk message (ThingsBoard's default)
JSON_LIMIT = 256 * 1024  # desired/reported/events/requests
ROLLOUT_LIMIT = 1024 * 1024  # one compressed rollout batch
PACKET_LIMIT = ROLLOUT_LIMIT + 4096  # what the broker accepts (Mosquitto max_packet_size)
QOS = 1
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SERVER_USER = "reled-server"


class ProtocolError(ValueError):
    """A message that breaks the protocol; the receiver reports it as an event and ignores it."""


def device_topic(device: str, leaf: str) -> str:
    """``leaf``: desired, reported, status, events, req/chunk, rollouts, rollouts/ack, hil/obs, hil/act."""
    return f"{ROOT}/dev/{device}/{leaf}"


def chunk_topic(sha256: str, index: int | str) -> str:
    return f"{ROOT}/models/{sha256}/chunk/{index}"


def device_of(topic: str) -> str:
    """The device id in ``reled/v1/dev/<id>/...``."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[:3] != ["reled", "v1", "dev"]:
        raise ProtocolError(f"not a device topic: {topic}")
    return parts[3]


def check_device_id(device: str) -> str:
    if not DEVICE_ID.match(device):
        raise ValueError(f"device id {device!r} must be 1-64 letters, digits, '_', '.' or '-' "
                         "(it becomes an MQTT user name and a topic level)")
    return device


def encode(document: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces, UTF-8): every message, and the exact bytes that are signed."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decode_json(payload: bytes, limit: int = JSON_LIMIT) -> dict[str, Any]:
    if len(payload) > limit:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {limit}-byte limit")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ProtocolError("malformed message: expected a JSON object")
    return document


def sign(document: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """A signed envelope ``{"doc": ..., "sig": base64}`` ready to publish."""
    signature = base64.b64encode(key.sign(encode(document))).decode()
    return encode({"doc": document, "sig": signature})


def verify(payload: bytes, key: Ed25519PublicKey) -> dict[str, Any]:
    """The signed document inside ``payload``, or ProtocolError (malformed, unsigned, bad signature)."""
    envelope = decode_json(payload)
    document, signature = envelope.get("doc"), envelope.get("sig")
    if not isinstance(document, dict) or not isinstance(signature, str):
        raise ProtocolError("unsigned document: expected {\"doc\": {...}, \"sig\": \"...\"}")
    try:
        key.verify(base64.b64decode(signature, validate=True), encode(document))
    except (InvalidSignature, ValueError) as exc:
        raise ProtocolError("bad signature: not signed by the pinned server key") from exc
    return document


@dataclass(frozen=True)
class Manifest:
    """What a device needs to fetch, check and accept a model; travels inside a signed deploy document."""

    sha256: str
    size: int
    chunk_size: int
    chunks: tuple[str, ...]  # sha256 of every chunk, in order
    schema_version: int
    intersection: str
    phase_table: tuple[str, ...]
    policy_version: int
    precision: str
    expires: float  # unix time

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "chunk_size": self.chunk_size, "chunks": list(self.chunks),
                "schema_version": self.schema_version, "intersection": self.intersection,
                "phase_table": list(self.phase_table), "policy_version": self.policy_version,
                "precision": self.precision, "expires": self.expires}

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise ProtocolError("deploy document without a manifest object")
        try:
            manifest = cls(sha256=str(data["sha256"]), size=int(data["size"]), chunk_size=int(data["chunk_size"]),
                           chunks=tuple(str(c) for c in data["chunks"]),
                           schema_version=int(data["schema_version"]), intersection=str(data["intersection"]),
                           phase_table=tuple(str(p) for p in data["phase_table"]),
                           policy_version=int(data["policy_version"]), precision=str(data["precision"]),
                           expires=float(data["expires"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"manifest lacks or garbles {exc}") from exc
        if not 0 < manifest.chunk_size <= CHUNK_LIMIT:
            raise ProtocolError(f"chunk size {manifest.chunk_size} outside 1..{CHUNK_LIMIT}")
        if len(manifest.chunks) != -(-manifest.size // manifest.chunk_size) or manifest.size <= 0:
            raise ProtocolError(f"manifest lists {len(manifest.chunks)} chunks for {manifest.size} bytes")
        return manifest

    @property
    def expired(self) -> bool:
        return time.time() > self.expires
