"""The MQTT protocol between the server and the controllers: topics, payload limits, signed documents.

Every server→device command is a JSON document signed with the server's Ed25519 key and carrying a
monotone ``seq``; the device pins the public key, so neither the broker nor another device can
forge or replay a command. Payload sizes are bounded before anything is parsed.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the server signs with `cryptography`; a controller only verifies and never imports it
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_runtime.credentials import PinnedKey

ROOT = "reled/v1"
CHUNK_LIMIT = 64 * 1024  # bytes of model per chunk message (ThingsBoard's default)
JSON_LIMIT = 256 * 1024  # desired/reported/events/requests
ROLLOUT_LIMIT = 1024 * 1024  # one compressed rollout batch
PACKET_LIMIT = ROLLOUT_LIMIT + 4096  # what the broker accepts (Mosquitto max_packet_size)
QOS = 1
MAX_DEPTH = 8  # RELED messages nest 4 levels at most
MAX_CONTAINERS = 1024  # arrays and objects per message, counted before parsing
MAX_NODES = 20_000  # values per message (a manifest lists one hash per chunk)
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
SERVER_USER = "reled-server"
BRIDGE_PREFIX = "reled-bridge-"  # + a site name: a site broker's user on the central broker (no device id may start so)
# A device's leaves by direction (the table in docs/edge.md §3): the device ACL lets a device read only what the
# server tells it and write only what it reports; a site broker's bridge carries the first in and the second out.
TO_DEVICE = ("desired", "rollouts/ack", "hil/obs")
FROM_DEVICE = ("status", "events", "req/chunk", "rollouts", "hil/act", "reported")


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


def check_site(site: str) -> str:
    if not SITE_ID.match(site):
        raise ValueError(f"site name {site!r} must be 1-32 letters, digits, '_' or '-' "
                         "(it becomes part of an MQTT user name, client id and topic)")
    return site


def bridge_user(site: str) -> str:
    """The MQTT user (and client id) a site broker's bridge has on the central broker."""
    return BRIDGE_PREFIX + check_site(site)


def site_topic(site: str) -> str:
    """Where the central and the site broker keep the state of the site's bridge: retained "1" or "0"."""
    return f"{ROOT}/sites/{site}/bridge"


def encode(document: dict[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces, UTF-8): every message, and the exact bytes that are signed."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _check_shape(document: Any) -> None:
    """Depth and size of a decoded document, walked without recursion."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            raise ProtocolError(f"message nested deeper than {MAX_DEPTH} levels or with over {MAX_NODES} values")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def decode_json(payload: bytes, limit: int = JSON_LIMIT) -> dict[str, Any]:
    """A JSON object from an untrusted peer, or ProtocolError: never RecursionError, MemoryError or a stray
    ValueError. Bounded before parsing (size, number of containers, which bounds the parser's recursion),
    refused after it when nested deeper than any RELED message is; NaN and Infinity are refused."""
    if len(payload) > limit:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {limit}-byte limit")
    if payload.count(b"[") + payload.count(b"{") > MAX_CONTAINERS:
        raise ProtocolError(f"message with over {MAX_CONTAINERS} arrays and objects")
    try:
        document = json.loads(payload, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also over-long integers
        raise ProtocolError(f"malformed JSON: {str(exc)[:200]}") from exc
    if not isinstance(document, dict):
        raise ProtocolError("malformed message: expected a JSON object")
    _check_shape(document)
    return document


def sign(document: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """A signed envelope ``{"doc": ..., "sig": base64}`` ready to publish."""
    signature = base64.b64encode(key.sign(encode(document))).decode()
    return encode({"doc": document, "sig": signature})


def verify(payload: bytes, key: PinnedKey) -> dict[str, Any]:
    """The signed document inside ``payload``, or ProtocolError (malformed, unsigned, bad signature)."""
    envelope = decode_json(payload)
    document, signature = envelope.get("doc"), envelope.get("sig")
    if not isinstance(document, dict) or not isinstance(signature, str):
        raise ProtocolError("unsigned document: expected {\"doc\": {...}, \"sig\": \"...\"}")
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise ProtocolError("bad signature: not base64") from exc
    if not key.verify(encode(document), raw):
        raise ProtocolError("bad signature: not signed by the pinned server key")
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
        """A manifest from a signed document: every field type- and range-checked by ``schema.MANIFEST`` (it
        names files and sizes), then the chunk list against the size."""
        from edge_runtime.schema import MANIFEST, validate  # the schema module builds on this one

        if not isinstance(data, dict):
            raise ProtocolError("deploy document without a manifest object")
        try:
            m = validate(data, MANIFEST)
        except ProtocolError as exc:
            raise ProtocolError(f"manifest lacks or garbles {exc}") from exc
        manifest = cls(sha256=m["sha256"], size=m["size"], chunk_size=m["chunk_size"], chunks=tuple(m["chunks"]),
                       schema_version=m["schema_version"], intersection=m["intersection"],
                       phase_table=tuple(m["phase_table"]), policy_version=m["policy_version"],
                       precision=m["precision"], expires=m["expires"])
        if len(manifest.chunks) != -(-manifest.size // manifest.chunk_size):
            raise ProtocolError(f"manifest lists {len(manifest.chunks)} chunks for {manifest.size} bytes")
        return manifest
