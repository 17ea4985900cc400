"""The server's key folder: the Ed25519 signing key devices pin, MQTT passwords, and a TLS CA.

Layout (all secrets 0600)::

    signing.key  signing.pub          Ed25519, PEM; devices get signing.pub only
    credentials/<user>.secret         one random password per device, one for the server and one per site broker
                                      (reled-bridge-<site>: its bridge's login on the central broker)
    tls/ca.crt ca.key                 the broker's CA (kept: devices pin ca.crt)
    tls/server.crt server.key         its certificate (reissued from the CA when the broker's names change)

``init`` is safe to run again: existing keys are kept and only missing devices get credentials.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from edge_runtime.credentials import read_password
from edge_runtime.errors import RELEDError
from edge_runtime.fileio import atomic_write_bytes
from edge_runtime.protocol import BRIDGE_PREFIX, SERVER_USER, bridge_user, check_device_id


def write_secret(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


@dataclass(frozen=True)
class KeyFolder:
    root: Path

    @property
    def signing_key_path(self) -> Path:
        return self.root / "signing.key"

    @property
    def public_key_path(self) -> Path:
        return self.root / "signing.pub"

    def secret_path(self, user: str) -> Path:
        return self.root / "credentials" / f"{user}.secret"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    def init(self, devices: list[str], sites: list[str] = ()) -> tuple[bool, list[str]]:
        """Create what is missing; returns (signing key created, users given new credentials). ``sites``: site
        brokers whose bridges log in to the central broker started from this folder."""
        try:
            bridges = [bridge_user(site) for site in sites]
            for device in devices:
                check_device_id(device)
        except ValueError as exc:
            raise RELEDError(str(exc)) from None
        for device in devices:
            if device == SERVER_USER:
                raise RELEDError(f"{SERVER_USER!r} is the server's own MQTT user: choose another device id")
            if device.startswith(BRIDGE_PREFIX):
                raise RELEDError(f"device id {device!r}: ids starting with {BRIDGE_PREFIX!r} are site brokers' "
                                 "bridge users: choose another device id")
        created = not self.signing_key_path.exists()
        if created:
            key = Ed25519PrivateKey.generate()
            write_secret(self.signing_key_path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            atomic_write_bytes(self.public_key_path, key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        new_users = [u for u in [SERVER_USER, *devices, *bridges] if not self.secret_path(u).exists()]
        for user in new_users:
            write_secret(self.secret_path(user), (secrets.token_urlsafe(24) + "\n").encode())
        return created, new_users

    def signing_key(self) -> Ed25519PrivateKey:
        try:
            key = serialization.load_pem_private_key(self.signing_key_path.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise RELEDError(f"no signing key in {self.root}: run `reled-edge keys init --keys {self.root}`") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise RELEDError(f"{self.signing_key_path} is not an Ed25519 private key")
        return key

    def users(self) -> list[str]:
        folder = self.root / "credentials"
        return sorted(p.stem for p in folder.glob("*.secret")) if folder.is_dir() else []

    def devices(self) -> list[str]:
        return [u for u in self.users() if u != SERVER_USER and not u.startswith(BRIDGE_PREFIX)]

    def sites(self) -> list[str]:
        """The site brokers that have bridge credentials here."""
        return [u.removeprefix(BRIDGE_PREFIX) for u in self.users() if u.startswith(BRIDGE_PREFIX)]

    def password(self, user: str) -> str:
        return read_password(self.secret_path(user))

    def ensure_tls(self, names: list[str]) -> Path:
        """A CA (created once) and a server certificate for exactly ``names`` (DNS names or IP addresses, the
        first one also its common name), reissued from that CA when the names change, so devices keep
        trusting the same ``ca.crt``; returns the CA certificate's path."""
        self.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_crt, ca_key_path, server_crt = (self.tls_dir / n for n in ("ca.crt", "ca.key", "server.crt"))
        pem = serialization.Encoding.PEM
        now = datetime.datetime.now(datetime.timezone.utc)
        if ca_crt.exists():
            ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
                raise RELEDError(f"{ca_key_path} is not the EC key this CA was made with")
        else:
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RELED fleet CA")])
            ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                  .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                  .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
                  .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                  .sign(ca_key, hashes.SHA256()))
            write_secret(ca_key_path, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
            atomic_write_bytes(ca_crt, ca.public_bytes(pem))
        wanted = x509.SubjectAlternativeName([_general_name(name) for name in names])
        if server_crt.exists() and _san(server_crt) == wanted:
            return ca_crt
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = (x509.CertificateBuilder()
                  .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                  .issuer_name(ca.subject).public_key(server_key.public_key())
                  .serial_number(x509.random_serial_number()).not_valid_before(now)
                  .not_valid_after(now + datetime.timedelta(days=825))
                  .add_extension(wanted, critical=False)
                  .sign(ca_key, hashes.SHA256()))
        write_secret(self.tls_dir / "server.key", server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                           serialization.NoEncryption()))
        atomic_write_bytes(server_crt, server.public_bytes(pem))
        return ca_crt


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _san(path: Path) -> x509.SubjectAlternativeName | None:
    """The names a certificate file is valid for (None: it names none)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()).extensions \
            .get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
