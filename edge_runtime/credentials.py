"""What a controller is given from the server's key folder: the public key it pins, and its MQTT password.

Signatures are checked with PyNaCl (libsodium), not with `cryptography`, which the server signs and makes TLS
certificates with: on a controller `cryptography` costs 7.6 MB of resident memory for one Ed25519 check,
libsodium 1.1 MB (tools/bench/edge_soak.py). Both implement Ed25519 (RFC 8032), so what one signs the other
verifies; every fleet test signs with the one and verifies with the other.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from edge_runtime.errors import RELEDError

# RFC 8410: the DER SubjectPublicKeyInfo of an Ed25519 key is this prefix and the 32 key bytes
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
PEM_LABEL = "PUBLIC KEY"


class PinnedKey:
    """The server's Ed25519 public key; :meth:`verify` says whether it signed a message."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self._key = VerifyKey(raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(message, signature)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True


def load_public_key(path: Path) -> PinnedKey:
    """``signing.pub`` as `reled-edge keys init` writes it (PEM SubjectPublicKeyInfo of an Ed25519 key)."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise RELEDError(f"public key {path} does not exist: copy signing.pub from the server's key folder") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RELEDError(f"{path} is not a PEM public key ({exc})") from exc
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or lines[0] != f"-----BEGIN {PEM_LABEL}-----" or lines[-1] != f"-----END {PEM_LABEL}-----":
        raise RELEDError(f"{path} is not a PEM public key")
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RELEDError(f"{path} is not a PEM public key") from exc
    if len(der) != len(ED25519_SPKI_PREFIX) + 32 or not der.startswith(ED25519_SPKI_PREFIX):
        raise RELEDError(f"{path} is not an Ed25519 public key")
    return PinnedKey(der[len(ED25519_SPKI_PREFIX):])


def read_password(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError as exc:
        raise RELEDError(f"password file {path} does not exist: run `reled-edge keys init --device ID`") from exc
